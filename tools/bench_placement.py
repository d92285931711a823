"""The training step on one process under each placement of the tables: shard_model's default, torchrec's planner
free to choose, table-wise, row-wise and data-parallel, taking turns step by step in one run (tools/bench_train_measure.time_steps), so the machine's
other load falls on all of them alike. It is what ``shard_model``'s one-process default rests on.

Data-parallel tables train outside backward with their own optimizer (torchrec's RowWiseAdagrad over the whole
table's gradient), not FBGEMM's fused kernel, so that row is a different kernel as well as a different placement.

    .venv/bin/python tools/bench_placement.py --out runs/bench_placement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_train_contenders import build_ours, make_batches, table_sizes  # noqa: E402
from tools.bench_train_measure import time_steps  # noqa: E402
from torchrec_mtl.train.distributed import SHARDING_TYPES, init_distributed  # noqa: E402
from torchrec_mtl.train.loop import make_pipeline  # noqa: E402

PLACEMENTS: Dict[str, Optional[List[str]]] = {
    "default": None,  # shard_model's choice on one process (ONE_PROCESS_SHARDING)
    "planner": list(SHARDING_TYPES),  # torchrec's planner free to pick any type per table
    "table_wise": ["table_wise"],
    "row_wise": ["row_wise"],
    "data_parallel": ["data_parallel"],
}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file")
    parser.add_argument("--item-rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small tables and few steps (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = init_distributed()
    sizes = table_sizes(args.item_rows, args.quick)
    batches = make_batches(sizes, args.batch_size, 8, seed=0)
    steppers, plans = {}, {}
    for name, types in PLACEMENTS.items():
        torch.manual_seed(0)
        sharded, optimizer, _ = build_ours(env, sizes, types)
        pipeline = make_pipeline(sharded, optimizer, env.device)
        sharded.train()
        source = iter(batches * (args.warmup + args.steps + 4))
        steppers[name] = lambda pipeline=pipeline, source=source: pipeline.progress(source)
        plans[name] = sorted({s.sharding_type for plan in sharded.plan.plan.values() for s in plan.values()})
    seconds = time_steps(steppers, args.steps, args.warmup)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "workload": {"tables": sizes, "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps},
        "sharding_types": plans,
        "median_step_seconds": medians,
        "samples_per_second": {name: args.batch_size / m for name, m in medians.items()},
        "speed_over_row_wise": {name: medians["row_wise"] / m for name, m in medians.items()},
    }
    for name in PLACEMENTS:
        print(f"{name:14s} {', '.join(plans[name]):28s} {medians[name] * 1000:8.1f} ms/step  "
              f"{result['speed_over_row_wise'][name]:.3f}x row-wise")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
