"""tools/compare_history.py: the models it compares (the din config as it is, its lists pooled, the history columns
ignored) and, on a tiny run, the JSON rows it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from torchrec_mtl.config import load_config
from torchrec_mtl.config.load import _read_yaml
from torchrec_mtl.schema import DatasetSchema

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


def _tool():
    sys.path.insert(0, str(TOOLS))  # the tool imports common from beside it
    spec = importlib.util.spec_from_file_location("compare_history", TOOLS / "compare_history.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("dataset", ["history", "movielens", "mind"])
def test_no_history_ignores_the_sequence_features_and_keeps_the_file_layout(dataset, tmp_path):
    tool = _tool()
    raw = _read_yaml(REPO / tool.CONFIGS[dataset])
    features = raw["model"]["sequence"]["features"]
    original = DatasetSchema.from_yaml(raw["data"]["schema"])
    assert features == original.list_columns  # the din configs attend over every list of their schema
    no_history = tool.build_variant(raw, "no_history", tmp_path)
    assert "sequence" not in no_history["model"] and "sequence" in raw["model"]  # the dataset's config untouched
    schema = DatasetSchema.from_yaml(no_history["data"]["schema"])
    assert schema.lists == {} and set(features) <= set(schema.ignore)
    assert schema.categorical == [c for c in original.categorical if c not in features]
    assert schema.header or schema.columns == original.columns  # a headerless file is read as before
    pooled = tool.build_variant(raw, "pooled", tmp_path)
    assert "sequence" not in pooled["model"] and pooled["data"] == raw["data"]
    assert tool.build_variant(raw, "history", tmp_path) == raw
    for variant in (pooled, no_history):  # each loads as a config
        load_config(raw=variant)


def test_without_a_sequence_every_list_column_is_a_history_column(tmp_path):
    tool = _tool()
    schema = DatasetSchema.from_yaml(REPO / "configs" / "datasets" / "synthetic_history.yaml")
    assert tool.history_columns({"model": {}}, schema) == ["hist_item", "hist_category"]
    assert tool.history_columns({"model": {"sequence": {"kind": "din", "features": ["hist_item"]}}}, schema) == [
        "hist_item"
    ]
    derived = tool.schema_without(str(REPO / "configs" / "datasets" / "synthetic_history.yaml"), ["hist_item"])
    assert derived["lists"] == {"hist_category": yaml.safe_load(
        (REPO / "configs" / "datasets" / "synthetic_history.yaml").read_text())["lists"]["hist_category"]}  # fmt: skip
    with pytest.raises(ValueError, match="no categorical"):
        tool.schema_without(str(REPO / "configs" / "datasets" / "synthetic_history.yaml"), ["nothing"])


def test_a_tiny_comparison_writes_one_row_per_model_task_and_metric(tmp_path, capsys):
    tool = _tool()
    generate = "{profile: history, num_rows: 6000, num_users: 100, num_items: 80, num_brands: 10, click_rate: 0.1}"
    overrides = [f"data.dir={tmp_path / 'data'}", f"data.generate={generate}", "model.text=null",
                 "training.epochs=1", "data.validation_fraction=0", "training.early_stopping=null",
                 "training.batch_size=256"]  # fmt: skip
    out = tmp_path / "rows.json"
    args = ["--datasets", "history", "--models", "pooled", "no_history", "--seeds", "0", "1",
            "--runs", str(tmp_path / "runs"), "--out", str(out), "--set", *overrides]  # fmt: skip
    assert tool.main(args) == 0
    rows = json.loads(out.read_text())
    keys = {(r["model"], r["task"], r["metric"]) for r in rows}
    for model in ("pooled", "no_history"):
        assert {(model, "ctr", "auc"), (model, "ctr", "gauc"), (model, "cvr", "auc"), (model, "rating", "rmse"),
                (model, "ctcvr", "auc")} <= keys  # fmt: skip
    for row in rows:
        assert set(row) == {"dataset", "model", "task", "metric", "mean", "std", "seeds", "values"}
        assert row["dataset"] == "history" and row["seeds"] == [0, 1] and len(row["values"]) == 2
    printed = capsys.readouterr().out
    assert "no_history" in printed and str(out) in printed
    # the no_history runs read shards of their own, without the lists; the pooled runs the config's
    assert (tmp_path / "data" / "shards_no_history").is_dir() and (tmp_path / "data" / "shards").is_dir()
    no_history = json.loads((tmp_path / "runs" / "history" / "no_history" / "seed0" / "results.json").read_text())
    assert no_history["config"]["data"]["shards"].endswith("shards_no_history")
    # a second call reuses every run
    assert tool.main(args) == 0 and "== history" not in capsys.readouterr().out
