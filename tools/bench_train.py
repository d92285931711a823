#!/usr/bin/env python3
"""Training throughput of our sharded path against plain PyTorch loops, side by side in one run; plus row-wise
sharding's per-rank memory and the MMoE tower's achieved FLOP rate.

The model, for every contender: 26 categorical features (one ID per row each) with one table per feature, a
``--item-rows`` item table (default 1,000,000 rows) and 25 more tables from 1,000 to 100,000 rows (geometric
spacing), embedding dim 64; 13 dense features through torchrec's DenseArch [512, 256, 64] (DLRM's Criteo bottom
MLP); torchrec's InteractionArch (pairwise dots), the dense and sparse vectors and the dots concatenated into an
MMoE tower (torchrec_mtl.modules.towers.MMoE: 4 experts [128, 64], heads [32]) with three heads: ``ctr`` and ``cvr``
(binary, BCE) and ``rating`` (regression, squared error), the three losses summed.

Contenders, stepped on the same batches (generated once, up front, from a seeded generator):

- ``ours``: torchrec_mtl.build.build_model -> MultiTaskTrain(MultiTaskObjective) -> shard_model
  (DistributedModelParallel at world size 1: fused FBGEMM TBE with row-wise Adagrad inside backward, Adam for the
  dense part) -> make_pipeline (TrainPipelineSparseDist); one step is one ``pipeline.progress``.
- ``naive``: what torch-rechub and DeepCTR-Torch do: one nn.EmbeddingBag per feature with dense gradients and one
  torch.optim.Adam (default settings) over all parameters.
- ``strong``: the strongest plain loop: nn.EmbeddingBag(sparse=True) per feature, torch.optim.SparseAdam for the
  tables and a fused torch.optim.Adam for the dense part.
- ``naive_fused_adam`` (context, no target): ``naive`` with torch's fused Adam kernel (``fused=True``) instead of
  the default per-tensor loop the peers get; it shows how much of naive's cost is the optimizer's implementation
  rather than the dense updates of every table row.

The dense part (DenseArch, InteractionArch, MMoE) is the same modules in every contender; the script checks that their
parameter counts agree. IDs are drawn from a truncated Zipf law, p(rank k) proportional to (k + 1) ** -1.05 (item
popularity in public logs such as MovieLens or Taobao follows roughly a power law with exponent near 1), and each
table's ranks are scattered over its rows by a fixed random permutation, as hashed IDs would be, so popular rows do
not all sit in one row-wise shard. Each step (forward, backward, optimizer) is timed after warm-up steps; the
contenders take turns step by step, so that load from other processes on the machine falls on all of them alike; the
median step time gives samples/s. ``noise_check`` repeats the ratios from each contender's fastest quarter of steps
(25th percentile): on a machine shared with other processes, far apart medians and quartiles mean the run was
disturbed.

``row_wise_memory_ratio``: per-rank embedding memory at world size 2 over world size 1, both with every table
row-wise sharded (``shard_model(..., sharding_types=["row_wise"])``): the bytes of this rank's local shards of every
ShardedTensor in ``sharded.state_dict()`` (the table weights) plus those in ``sharded.fused_optimizer.state_dict()``
(row-wise Adagrad's state), the largest over ranks; each world size runs in fresh processes of this script (gloo on
a free localhost port), which also report their peak resident memory (getrusage's maxrss, whole process).

``tower_flops_fraction``: the tower's achieved GFLOP/s over what plain matrix products reach on this machine.
Numerator: forward and backward of the MMoE tower alone on a [B, in_features] input that requires grad (as the
embeddings do in the model), median time of repeats; FLOPs counted analytically from its Linear layers, 2 * B * in
* out forward and twice that backward (input and weight gradients); elementwise ops, softmax and the gate mixing are
not counted. Denominator: the same three products for the tower's largest Linear layer (an expert's first layer,
in_features -> 128) as torch.mm alone on tensors of the same shapes and layouts (forward x @ W^T, input gradient
g @ W, weight gradient g^T @ x), their median times summed; the tower step and the products take turns. Prints a
table and writes JSON (``targets`` says which acceptance target this run meets; ``config.load_average_before_after``
shows whether other processes shared the CPUs while the steps were timed).

The contenders' models and batches are in bench_train_contenders.py, the timing, FLOP and memory measurements in
bench_train_measure.py; this script runs them and reports.

Example::

    .venv/bin/python tools/bench_train.py --sweep 512,2048,4096 --out runs/bench_train.json
    .venv/bin/python tools/bench_train.py --quick --item-rows 5000 --out /tmp/bench_train.json  # a smoke run
    # on CPUs shared with other processes: OpenMP threads that sleep instead of spinning lose less to the others
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_train.py --out /tmp/bench_train_passive.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from bench_train_contenders import (
    EMBEDDING_DIM,
    MODEL,
    NUM_DENSE,
    NUM_SPARSE,
    TASKS,
    ZIPF_EXPONENT,
    build_contenders,
    make_batches,
    table_sizes,
)
from bench_train_measure import measure_memory, memory_worker, quartile, time_steps, tower_flops
from common import quiet
from torchrec_mtl.config import TrainingConfig
from torchrec_mtl.model import MultiTaskModel
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed

TARGETS = {  # the acceptance: key -> (bound, "min" or "max")
    "speedup_vs_naive": (5.0, "min"),
    "speedup_vs_strong": (1.0, "min"),
    "row_wise_memory_ratio": (0.55, "max"),
    "tower_flops_fraction": (0.5, "min"),
}


def batch_sweep(
    env: DistributedEnv, sizes: Dict[str, int], batch_sizes: List[int], args: argparse.Namespace, progress: bool
) -> List[Dict[str, Any]]:
    """Ours over naive and over strong at other batch sizes: the naive loop's dense Adam over every table row costs
    the same per step whatever the batch, so its gap to ours narrows as batches grow."""
    rows = []
    for batch_size in batch_sizes:
        batches = make_batches(sizes, batch_size, args.warmup + args.steps + 2, seed=0, progress=False)
        steppers, _ = build_contenders(env, sizes, batches)
        steppers.pop("naive_fused_adam")
        medians = {n: statistics.median(t) for n, t in time_steps(steppers, args.steps, args.warmup, progress).items()}
        del steppers
        rows.append(
            {
                "batch_size": batch_size,
                **{f"{name}_samples_per_s": round(batch_size / m, 1) for name, m in medians.items()},
                "speedup_vs_naive": round(medians["naive"] / medians["ours"], 3),
                "speedup_vs_strong": round(medians["strong"] / medians["ours"], 3),
            }
        )
    return rows


def target_report(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each acceptance target with its bound and whether this run meets it."""
    report = {}
    for key, (bound, kind) in TARGETS.items():
        value = result[key]
        report[key] = {"value": value, kind: bound, "met": value >= bound if kind == "min" else value <= bound}
    return report


def summary_table(result: Dict[str, Any]) -> str:
    """The printed summary: each contender's rate, the noise check and the targets."""
    lines = [f"{'contender':<18}{'samples/s':>12}{'median step ms':>16}{'ours over it':>14}"]
    for name in result["median_step_seconds"]:
        rate = result[f"{name}_samples_per_s"]
        ratio = result["ours_samples_per_s"] / rate
        lines.append(f"{name:<18}{rate:>12,.0f}{1000 * result['median_step_seconds'][name]:>16.1f}{ratio:>13.2f}x")
    noise = result["noise_check"]
    lines.append(
        f"(fastest quarter of steps: ours over naive {noise['speedup_vs_naive_p25']:.2f}x, over strong "
        f"{noise['speedup_vs_strong_p25']:.2f}x; tower fraction {noise['tower_flops_fraction_p25']:.3f})\n"
    )
    for key, target in result["targets"].items():
        bound = f">= {target['min']}" if "min" in target else f"<= {target['max']}"
        lines.append(f"{key:<24}{target['value']:>10.3f}  target {bound:<8} {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per step (default: the job's training.batch_size, 1024; 256 with --quick)"
    )
    parser.add_argument(
        "--sweep", default="", help="comma-separated batch sizes at which to time the contenders again (e.g. 512,2048)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 20; 3 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per contender first (default 3; 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--item-rows", type=int, default=1_000_000, help="rows of the item table")
    parser.add_argument("--quick", action="store_true", help="small tables and few steps: a smoke run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: one rank of measure_memory
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_size = args.batch_size or (256 if quick else TrainingConfig().batch_size)
    args.steps = args.steps or (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    if args.memory_worker:
        memory_worker(args)
        return 0
    quiet()
    progress = not args.no_progress
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    # first, while this process holds no model: the memory workers then do not compete with timed steps
    memory = measure_memory(args, progress)

    env = init_distributed()
    sizes = table_sizes(args.item_rows, quick)
    # the pipeline runs up to two batches ahead of the one it trains on
    count = args.warmup + args.steps + 2
    batches = make_batches(sizes, args.batch_size, count, seed=0, progress=progress)

    steppers, dense_parameters = build_contenders(env, sizes, batches)
    load_before = os.getloadavg()
    times = time_steps(steppers, args.steps, args.warmup, progress)
    load_after = os.getloadavg()
    del steppers  # and with them the models: the tables' memory is free again before the tower timing
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    rates = {name: args.batch_size / seconds for name, seconds in medians.items()}
    flops = tower_flops(args.batch_size, repeats=3 if quick else 15, progress=progress)

    unique_items = [int(batch.sparse_features["item"].values().unique().numel()) for batch in batches]
    result: Dict[str, Any] = {
        **{f"{name}_samples_per_s": round(rate, 1) for name, rate in rates.items()},
        "speedup_vs_naive": round(rates["ours"] / rates["naive"], 3),
        "speedup_vs_strong": round(rates["ours"] / rates["strong"], 3),
        "speedup_vs_naive_fused_adam": round(rates["ours"] / rates["naive_fused_adam"], 3),
        "row_wise_memory_ratio": memory["row_wise_memory_ratio"],
        "tower_flops_fraction": flops["tower_flops_fraction"],
        "median_step_seconds": {name: round(s, 5) for name, s in medians.items()},
        "noise_check": {
            "p25_samples_per_s": {name: round(args.batch_size / quartile(s), 1) for name, s in times.items()},
            **{
                f"speedup_vs_{name}_p25": round(quartile(times[name]) / quartile(times["ours"]), 3)
                for name in ("naive", "strong", "naive_fused_adam")
            },
            "tower_flops_fraction_p25": flops["tower_flops_fraction_p25"],
        },
        "memory": memory,
        "tower": flops,
        "config": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "quick": quick,
            "table_sizes": sizes,
            "embedding_rows": sum(sizes.values()),
            "embedding_dim": EMBEDDING_DIM,
            "num_dense": NUM_DENSE,
            "dense_arch_layer_sizes": MODEL.dense_arch_layer_sizes,
            "tower": {
                "kind": MODEL.tower.kind,
                "num_experts": MODEL.tower.num_experts,
                "expert_layer_sizes": MODEL.tower.expert_layer_sizes,
                "tower_layer_sizes": MODEL.tower.tower_layer_sizes,
                "in_features": MultiTaskModel.tower_in_features(NUM_SPARSE, EMBEDDING_DIM),
            },
            "tasks": TASKS.names,
            "dense_parameters": dense_parameters,
            "zipf_exponent": ZIPF_EXPONENT,
            "unique_item_ids_per_batch_median": statistics.median(unique_items),
            "torch": torch.__version__,
            "torchrec": _version("torchrec"),
            "fbgemm_gpu": _version("fbgemm_gpu"),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            # 1-minute load averages around the timed steps: above the thread count, other processes shared the CPUs
            "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            # GNU OpenMP's threads spin between parallel regions unless this is PASSIVE; on CPUs shared with other
            # processes spinning threads lose their turns, which slows every contender (read at torch's import)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        },
        "step_seconds": {name: [round(s, 5) for s in seconds] for name, seconds in times.items()},
    }
    if args.sweep:
        result["sweep"] = batch_sweep(env, sizes, [int(b) for b in args.sweep.split(",")], args, progress)
    result["targets"] = target_report(result)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary_table(result))
    for row in result.get("sweep", []):
        print(f"batch {row['batch_size']:>5}: ours over naive {row['speedup_vs_naive']:.2f}x, over strong "
              f"{row['speedup_vs_strong']:.2f}x")  # fmt: skip
    print(
        f"batch {args.batch_size}, {args.steps} timed steps each, {args.threads} threads; "
        f"ws2 per-rank embedding bytes {memory['embedding_bytes_ws2_per_rank']} over ws1 "
        f"{memory['embedding_bytes_ws1']}; tower {flops['tower_gflops_per_s']} GFLOP/s, "
        f"mm {flops['mm_gflops_per_s']} GFLOP/s\n-> {args.out}"
    )
    return 0


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except (ImportError, AttributeError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())