"""tools/bench_towers.py at smoke size, in this process: the contenders compute the same function, and every row
is there with positive, finite figures."""

from __future__ import annotations

import importlib.util as loader
import json
import math
from pathlib import Path

import torch


def test_the_tower_benchmark_times_every_contender_at_every_width(tmp_path, capsys):
    spec = loader.spec_from_file_location("bench_towers", Path(__file__).resolve().parents[1] / "tools/bench_towers.py")
    tool = loader.module_from_spec(spec)
    spec.loader.exec_module(tool)
    threads = torch.get_num_threads()
    try:
        tool.main(["--out", str(tmp_path / "t.json"), "--in-features", "12", "20", "--batch", "32", "--experts", "3",
                   "--expert-sizes", "8", "4", "--steps", "2", "--warmup", "1", "--threads", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [(r["in_features"], r["contender"]) for r in rows] == [
        (width, name) for width in (12, 20) for name in ("per_expert", "fused", "fused_gates_apart")
    ]
    for row in rows:
        assert row["largest_logit_difference"] < 1e-5
        for key in ("median_ms", "speedup", "speedup_p25", "over_gates_apart"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert all(r["speedup"] == 1.0 for r in rows if r["contender"] == "per_expert")
    assert "per_expert" in capsys.readouterr().out
