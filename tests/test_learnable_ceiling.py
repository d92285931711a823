"""tools/learnable_ceiling.py fits its two models per task (CTR, CVR) on a generated log and reports test AUCs chosen on validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from torchrec_mtl.data.synthetic import SyntheticConfig, generate

TOOL = Path(__file__).resolve().parents[1] / "tools" / "learnable_ceiling.py"


def test_the_learnable_ceiling_lies_between_chance_and_the_bayes_ceiling(tmp_path: Path) -> None:
    config = SyntheticConfig(profile="affinity", num_rows=40_000, num_users=1_000, num_items=300, seed=5)
    meta = generate(config, tmp_path / "log")
    out = tmp_path / "ceiling.json"
    subprocess.run([sys.executable, str(TOOL), "--data", str(tmp_path / "log"), "--out", str(out)], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    results = json.loads(out.read_text())
    assert results["bayes_ceilings"] == meta["ceilings"]
    for task, chance_plus in (("ctr", 0.55), ("cvr", 0.5)):  # the CVR models see the few clicked rows only
        for name in ("crosses", "crosses+fm"):
            fitted = results[task][name]
            assert chance_plus < fitted["test_auc"] < meta["ceilings"][f"{task}_auc"], (task, fitted)
            assert fitted["l2"] in (1e-4, 1e-3, 1e-2) and 1 <= fitted["epoch"] <= 3
