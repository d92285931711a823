"""tools/compare_peers.py hands the peers the rows our run uses: the same train, validation and test rows, with the
same labels, as the run counts and scores them. Needs no peer venv (the peers themselves are a benchmark by hand)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from torchrec_mtl.config import load_config
from torchrec_mtl.data.shards import EncodedLog, ShardedLog

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool():
    sys.path.insert(0, str(TOOLS))  # the tool imports common from beside it
    spec = importlib.util.spec_from_file_location("compare_peers", TOOLS / "compare_peers.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _label_counts(arrays, split: str) -> dict:
    """What our results report per task (rows, positives) for the exported split: CVR on clicked rows."""
    click, cvr = arrays[f"{split}_ctr"], arrays[f"{split}_cvr"]
    clicked = ~np.isnan(cvr)
    return {
        "ctr": (len(click), int(click.sum())),
        "cvr": (int(clicked.sum()), int(cvr[clicked].sum())),
        "ctcvr": (len(click), int(cvr[clicked].sum())),
    }


def _row_keys(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> list:
    """Each row as one hashable tuple, sorted: two splits hold the same rows when their lists are equal."""
    return sorted(map(tuple, np.concatenate([dense, sparse.astype(np.float64), labels], axis=1).tolist()))


@pytest.mark.parametrize("seed", [1])
def test_exported_rows_are_the_train_validation_and_test_rows_of_our_run(small_log, tmp_path, seed):
    tool, common = _tool(), sys.modules["common"]
    config = load_config("configs/mmoe_synthetic.yaml", [
        f"data.dir={small_log}", "data.generate=null", f"data.shards={tmp_path / 'shards'}", "model.text=null",
        "data.validation_fraction=0.1", f"training.seed={seed}", "training.early_stopping={metric: mean_auc}",
        "training.batch_size=512", "training.eval_batch_size=4096", "training.progress=false",
        "training.curve_every=0", "checkpoint.at_end=false", f"out_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    results = common.run_or_reuse(config)
    npz, meta_path = tool.export_rows(config, tmp_path / "rows", max_epochs=1, patience=1)
    arrays, meta = np.load(npz), json.loads(meta_path.read_text())

    # the row counts the run trained, validated and tested on
    assert meta["rows"] == results["training"]["rows"]
    assert {s: len(arrays[f"{s}_ctr"]) for s in ("train", "validation", "test")} == results["training"]["rows"]
    # the labels its validation and test metrics were computed on: rows and positives of CTR, CVR (clicked), CTCVR
    validation = results["training"]["validation"][-1]["tasks"]
    for split, reported in (("validation", validation), ("test", results["tasks"])):
        counts = _label_counts(arrays, split)
        assert counts == {task: (reported[task]["rows"], reported[task]["positives"]) for task in counts}, split

    # row for row: the test rows are the test shards; train and validation together are the training shards
    log = ShardedLog.open(tmp_path / "shards")
    test = EncodedLog.concat(log.split("test"))
    np.testing.assert_array_equal(arrays["test_dense"], test.dense)
    np.testing.assert_array_equal(arrays["test_sparse"], test.sparse)
    np.testing.assert_array_equal(arrays["test_ctr"], test.labels["click"])
    train = EncodedLog.concat(log.split("train"))
    exported = [np.concatenate([arrays[f"{s}_{part}"] for s in ("train", "validation")])
                for part in ("dense", "sparse", "ctr")]  # fmt: skip
    assert _row_keys(exported[0], exported[1], exported[2][:, None]) == _row_keys(
        train.dense, train.sparse, train.labels["click"][:, None]
    )
    assert meta["table_sizes"] == [log.table_sizes[f] for f in log.categorical_features]
    assert all((arrays[f"{s}_sparse"].max(axis=0) < np.array(meta["table_sizes"])).all() for s in ("train", "test"))

    # a second export with the same data and seed keeps the files
    before = npz.stat().st_mtime_ns
    assert tool.export_rows(config, tmp_path / "rows", max_epochs=1, patience=1)[0].stat().st_mtime_ns == before


def test_the_peer_runner_scores_cvr_on_clicked_rows_and_ctcvr_as_the_product():
    """tools/peer_runner.py's metrics, without the peers: it imports only numpy, torch and scikit-learn at the top."""
    pytest.importorskip("sklearn")  # the peer venv has it; ours need not
    spec = importlib.util.spec_from_file_location("peer_runner", TOOLS / "peer_runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rows = {"ctr": np.array([0, 1, 1, 0, 1.0]), "cvr": np.array([np.nan, 1, 0, np.nan, 0])}
    aucs = runner.task_aucs(rows, np.array([0.1, 0.9, 0.8, 0.2, 0.3]), np.array([0.9, 0.6, 0.4, 0.9, 0.5]))
    assert aucs["cvr"] == 1.0  # the unclicked rows' high pCVR does not count
    assert aucs["ctcvr"] == 1.0 and aucs["ctr"] == 1.0
    assert runner.mean_auc({"ctr": 0.7, "cvr": float("nan"), "ctcvr": 0.9}) == pytest.approx(0.8)
