"""tools/bench_train.py end to end at smoke size, as a user runs it (its own process): every figure is there,
positive and finite, and the ratios agree with the rates they come from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_train.py"

FIGURES = [
    "ours_samples_per_s",
    "naive_samples_per_s",
    "strong_samples_per_s",
    "naive_fused_adam_samples_per_s",
    "speedup_vs_naive",
    "speedup_vs_strong",
    "speedup_vs_naive_fused_adam",
    "row_wise_memory_ratio",
    "tower_flops_fraction",
]



def test_bench_train_quick_writes_every_figure(tmp_path):
    out = tmp_path / "bench_train.json"
    # one thread: on two cores shared with other test processes, two OpenMP threads mostly wait for each other
    args = ["--quick", "--item-rows", "2000", "--threads", "1", "--no-progress", "--sweep", "128", "--out", str(out)]
    subprocess.run([sys.executable, str(TOOL), *args], check=True, cwd=TOOL.parents[1])
    result = json.loads(out.read_text())

    for key in FIGURES:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    for name in ("naive", "strong", "naive_fused_adam"):
        ratio = result["ours_samples_per_s"] / result[f"{name}_samples_per_s"]
        assert math.isclose(result[f"speedup_vs_{name}"], ratio, rel_tol=1e-2), (name, result[f"speedup_vs_{name}"])

    memory = result["memory"]
    largest_ws2 = max(memory["embedding_bytes_ws2_per_rank"])
    assert math.isclose(memory["row_wise_memory_ratio"], largest_ws2 / memory["embedding_bytes_ws1"], rel_tol=1e-3)
    # row-wise over two ranks: each holds about half the rows (and their optimizer state)
    assert 0.4 < result["row_wise_memory_ratio"] < 0.65
    assert memory["peak_rss_mb_ws1"] > 0 and all(mb > 0 for mb in memory["peak_rss_mb_ws2_per_rank"])

    config = result["config"]
    assert config["batch_size"] == 256 and config["table_sizes"]["item"] == 2000
    assert len(config["table_sizes"]) == 26 and config["threads"] == 1
    assert all(len(result["step_seconds"][name]) == config["steps"] for name in result["median_step_seconds"])
    (row,) = result["sweep"]  # the contenders again at another batch size
    assert row["batch_size"] == 128 and row["speedup_vs_naive"] > 0 and row["ours_samples_per_s"] > 0
    assert set(result["targets"]) == {"speedup_vs_naive", "speedup_vs_strong", "row_wise_memory_ratio",
                                      "tower_flops_fraction"}  # fmt: skip
