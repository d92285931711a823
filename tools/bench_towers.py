#!/usr/bin/env python3
"""The MMoE tower's training step, per-expert layout against the expert bank, side by side in one run.

Contenders, each one training step (forward, backward, torch.optim.Adam step) of an MMoE tower on the same
[batch, in_features] input that requires grad (as the embeddings and dense arch do in the model) with one BCE loss
per task, summed:

- ``per_expert``: the tower as it was before ``ExpertBank`` (``PerExpertMMoE`` below, kept only here: each expert
  its own torchrec MLP, run one after another; each task's gate its own product; one product per gate to mix);
- ``fused``: torchrec_mtl.modules.towers.MMoE as it is: the experts one ``ExpertBank`` (first layers one matrix
  product, later layers one batched product), the gates' logits in the same product as the experts' first layers,
  all gates mixed in one batched product;
- ``fused_gates_apart``: ``fused`` with ``fuse_gates = False`` (each gate its own product): what folding the gates
  into the first layer adds.

The fused towers hold the per-expert tower's weights (its state dict, loaded through the old-layout mapping), so
all compute the same function; the script checks that their outputs agree before timing. Default shape: the peers'
comparison's (batch 2048; in_features 429 and 783; 4 experts [256, 128]; heads [64]; 3 tasks; 2 threads).

The contenders take turns step by step (their order rotating each round) so that load from other processes on the
machine falls on all of them alike. Reported per contender and input width: the median step time, and
``speedup``, the median over rounds of the per-expert step's time over the contender's in the same round (above 1:
faster than per-expert); ``speedup_p25`` the same ratio from each one's fastest quarter of steps (far from
``speedup``: the run was disturbed); ``speedup_iqr`` the quartiles of the per-round ratios; ``over_gates_apart``
the same median ratio against ``fused_gates_apart``. Prints a table and writes the rows as JSON, with the load
average before and after each width's rounds and OMP_WAIT_POLICY.

On CPUs shared with other processes the ratio depends on OpenMP's waiting. With its default (threads spin, then
yield) a thread that loses its core stalls every parallel region of the step, and the bank's fewer, larger operations
gain much; with ``OMP_WAIT_POLICY=PASSIVE``, or one thread, the steps took about the same time (the same matrix
products, at the same rate, bound them).

Example::

    .venv/bin/python tools/bench_towers.py --out runs/bench_towers.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_towers.py --out runs/bench_towers_passive.json
    .venv/bin/python tools/bench_towers.py --steps 3 --batch 64 --in-features 32 --out /tmp/t.json  # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.modules.mlp import MLP

TOOLS = str(Path(__file__).resolve().parent)
if TOOLS not in sys.path:  # loaded from its file (tests/test_bench_towers.py), not run as a script
    sys.path.insert(0, TOOLS)

from common import save_rows  # noqa: E402
from torchrec_mtl.modules.tower_parts import Gate, TaskHeads  # noqa: E402
from torchrec_mtl.modules.towers import MMoE  # noqa: E402

REFERENCE = "per_expert"


class PerExpertMMoE(nn.Module):
    """MMoE before ExpertBank (the reference only): each expert its own MLP, each task's gate mixed on its own."""

    def __init__(self, in_features: int, task_names: Sequence[str], num_experts: int,
                 expert_layer_sizes: Sequence[int], tower_layer_sizes: Sequence[int]) -> None:  # fmt: skip
        super().__init__()
        self.task_names = list(task_names)
        self.experts = nn.ModuleList([MLP(in_features, list(expert_layer_sizes)) for _ in range(num_experts)])
        self.gates = nn.ModuleDict({name: Gate(in_features, num_experts) for name in self.task_names})
        self.heads = TaskHeads(list(expert_layer_sizes)[-1], self.task_names, tower_layer_sizes)

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        expert_outputs = torch.stack([expert(features) for expert in self.experts], dim=1)  # [B, E, D]
        mix = lambda weights: torch.bmm(weights.unsqueeze(1), expert_outputs).squeeze(1)  # noqa: E731
        return self.heads({name: mix(gate(features)) for name, gate in self.gates.items()})


def contenders(args: argparse.Namespace, in_features: int) -> Dict[str, nn.Module]:
    tasks = [f"task{t}" for t in range(args.tasks)]
    sizes = dict(num_experts=args.experts, expert_layer_sizes=args.expert_sizes, tower_layer_sizes=args.tower_sizes)
    torch.manual_seed(0)
    reference = PerExpertMMoE(in_features, tasks, **sizes)
    towers: Dict[str, nn.Module] = {REFERENCE: reference}
    for name, fuse_gates in (("fused", True), ("fused_gates_apart", False)):
        tower = MMoE(in_features, tasks, **sizes)
        tower.load_state_dict(reference.state_dict())  # the per-expert keys, stacked by ExpertBank
        tower.fuse_gates = fuse_gates
        towers[name] = tower
    return towers


def stepper(tower: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(tower.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features.grad = None
        logits = torch.stack(list(tower(features).values()), dim=1)
        nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum").backward()
        optimizer.step()

    return step


def check_same_function(towers: Dict[str, nn.Module], features: torch.Tensor) -> float:
    """The largest difference between any contender's logits and the reference's (they hold the same weights)."""
    with torch.no_grad():
        outputs = {name: tower(features) for name, tower in towers.items()}
    reference = outputs[REFERENCE]
    return max(float((out[task] - reference[task]).abs().max()) for out in outputs.values() for task in reference)


def time_rounds(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds of each contender's step in each of ``rounds`` timed rounds, after ``warmup`` untimed ones; the
    order within a round rotates, so that no contender always follows the same other."""
    names, times = list(steps), {name: [] for name in steps}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steps[name]()
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def measure(args: argparse.Namespace, in_features: int) -> List[Dict]:
    towers = contenders(args, in_features)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(args.batch, in_features, generator=generator).requires_grad_()
    labels = (torch.rand(args.batch, args.tasks, generator=generator) < 0.3).float()
    largest_difference = check_same_function(towers, features)
    if largest_difference > 1e-4:
        raise SystemExit(f"the contenders compute different functions (logits differ by {largest_difference:.2e})")
    load_before = os.getloadavg()[0]
    times = time_rounds({name: stepper(t, features, labels) for name, t in towers.items()}, args.steps, args.warmup)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    reference, apart = np.array(times[REFERENCE]), np.array(times["fused_gates_apart"])
    rows = []
    for name, seconds in times.items():
        ratios = reference / np.array(seconds)
        rows.append({
            "in_features": in_features, "contender": name, "median_ms": round(1e3 * statistics.median(seconds), 2),
            "speedup": round(float(np.median(ratios)), 3),
            "speedup_iqr": [round(float(np.percentile(ratios, q)), 3) for q in (25, 75)],
            "speedup_p25": round(float(np.percentile(reference, 25) / np.percentile(seconds, 25)), 3),
            "over_gates_apart": round(float(np.median(apart / np.array(seconds))), 3),
            "steps": args.steps, "batch": args.batch, "experts": args.experts, "expert_sizes": args.expert_sizes,
            "tower_sizes": args.tower_sizes, "tasks": args.tasks, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "load_average_before_after": load,
            "largest_logit_difference": largest_difference,
        })  # fmt: skip
    return rows


def table(rows: List[Dict]) -> str:
    lines = [f"{'in':>5}  {'contender':<18} {'median ms':>10} {'speedup':>8} {'IQR':>13} {'p25':>6} {'/apart':>7}"]
    for row in rows:
        low, high = row["speedup_iqr"]
        lines.append(f"{row['in_features']:>5}  {row['contender']:<18} {row['median_ms']:>10.1f} "
                     f"{row['speedup']:>8.3f} {low:>6.3f}-{high:<6.3f} {row['speedup_p25']:>6.3f} "
                     f"{row['over_gates_apart']:>7.3f}")  # fmt: skip
    first = rows[0]
    lines.append(f"threads {first['threads']}, OMP_WAIT_POLICY {first['omp_wait_policy']}, load average before/after "
                 + ", ".join(f"{row['in_features']}: {row['load_average_before_after']}" for row in rows[::3]))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the JSON rows go")
    parser.add_argument("--in-features", type=int, nargs="+", default=[429, 783])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--expert-sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--tower-sizes", type=int, nargs="*", default=[64])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed rounds (one step of each contender each)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for in_features in args.in_features for row in measure(args, in_features)]
    save_rows(rows, args.out, table(rows))


if __name__ == "__main__":
    main()
