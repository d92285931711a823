"""What docs/operations.md ("Reproducibility") promises, checked:

- across machines: a seed fixes the generated log byte for byte (numpy's Generator with the same numpy release,
  polars' writer pinned), so these hashes hold on any machine;
- on one machine, same thread count and world size: a seed fixes training, so two runs give identical predictions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from torchrec_mtl.cli import main
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from conftest import ONE_PASS

SMALL = SyntheticConfig(num_rows=5000, num_users=100, num_items=60, num_brands=10, num_sessions=200, seed=7)
# computed with numpy 2.4 and polars 2.1 (numpy may change a distribution's algorithm between releases)
LOG_SHA256 = {
    "train.tsv": "e66e1e1dfdfd18c11f1663337c97fd7c554946e367de8245e77ba5fc0d33d979",
    "test.tsv": "d20bb6d6e0d56856a095f433180889a2b09fc05c8549f38703cbb50f65faffa6",
    "items.tsv": "4ab007a10996c9cbd0f9a28d167671bdbc6d48b2e1c8218fb998584ee27167fd",
    "test_truth.tsv": "577c4294f548b3f65f6db954a68e56c6e33c8e8d8f20b559971670aac1f812af",
}


def test_a_seed_fixes_the_generated_log_byte_for_byte_on_any_machine(tmp_path):
    if not np.__version__.startswith("2.4."):
        pytest.skip(f"the hashes were taken with numpy 2.4; this is numpy {np.__version__}")
    generate(SMALL, tmp_path)
    found = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in LOG_SHA256}
    assert found == LOG_SHA256


def test_a_seed_fixes_training_on_one_machine(tmp_path):
    generate(SMALL, tmp_path / "data")
    predictions = []
    for run in ("first", "second"):
        out = tmp_path / run
        code = main(["train", "--config", "configs/mmoe_synthetic.yaml", f"data.dir={tmp_path / 'data'}",
                     "data.generate=null", *ONE_PASS, "model.text=null", f"out_dir={out}", "training.batch_size=128",
                     "training.progress=false", "training.curve_every=0"])  # fmt: skip
        assert code == 0
        predictions.append(dict(np.load(out / "predictions.npz")))
    assert predictions[0].keys() == predictions[1].keys()
    for key in predictions[0]:
        np.testing.assert_array_equal(predictions[0][key], predictions[1][key], err_msg=key)
