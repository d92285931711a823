"""tools/history_ceiling.py: on a log whose click depends only on whether the candidate is in the history, the
history model finds it and the model without history cannot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _write_log(path: Path, rows: int, rng: np.random.Generator) -> None:
    """Rows in impressions of 4: click with probability 0.9 when the candidate item is in the row's history, 0.1
    when not (half the rows each); user and item alone say nothing. Every tenth history is empty."""
    items = np.arange(100)
    records = []
    for row in range(rows):
        history = [] if row % 10 == 0 else list(rng.choice(items, size=8, replace=False))
        in_history = bool(history) and rng.random() < 0.5
        candidate = rng.choice(history) if in_history else rng.choice(np.setdiff1d(items, history))
        click = int(rng.random() < (0.9 if in_history else 0.1))
        records.append({"click": click, "user": int(rng.integers(50)), "item": int(candidate),
                        "impression": row // 4, "hist_item": "|".join(str(i) for i in history)})  # fmt: skip
    pl.DataFrame(records).write_csv(path, separator="\t")


def test_the_history_model_finds_a_click_that_only_the_history_explains(tmp_path: Path) -> None:
    sys.path.insert(0, str(TOOLS))
    import history_ceiling

    rng = np.random.default_rng(0)
    _write_log(tmp_path / "train.tsv", 3000, rng)
    _write_log(tmp_path / "test.tsv", 1000, rng)
    out = tmp_path / "ceiling.json"
    history_ceiling.main(["--data", str(tmp_path), "--single", "user", "item", "--lists", "hist_item",
                          "--query-pairs", "item:hist_item", "--out", str(out)])  # fmt: skip
    rows = {row["model"]: row for row in json.loads(out.read_text())}
    assert rows["history"]["test_auc"] > 0.8 and rows["history"]["validation_auc"] > 0.8
    assert rows["no_history"]["test_auc"] < 0.6
    assert rows["history"]["C"] in history_ceiling.C_GRID
    assert rows["history"]["rows_train"] == 3000 and rows["history"]["rows_test"] == 1000
    assert rows["history"]["rows_validation"] == 300  # 75 of the 750 impressions, whole
