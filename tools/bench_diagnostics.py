#!/usr/bin/env python3
"""What the default diagnostics cost in training time: the training loop (torchrec_mtl.train.loop.train, the CLI's)
run on the same generated log twice at once, once with the diagnostics a run makes by default and once with all of
them off, the two taking turns step by step, for a few repetitions.

The default diagnostics, read from the config's defaults so that this follows them: the training curve
(``training.curve_every``: each point's window of predictions kept on the host and its metrics computed, and the
MMoE's gates watched over the window, ``GateMonitor``) and the gradient cosine between the loss terms
(``objective.gradient_cosine_every``). Off: both 0. The progress bar is off in both (it is display, not a
diagnostic); the checks the job makes before training (features that copy a label) and after it (leaks, gates over
the test set) are outside training time.

Each run is a training loop in a thread of its own; the two take turns one step at a time in the order a, b, b, a,
... (each follows itself as often as the other), so that the load of other processes on a shared machine, which
changes by the second, falls on both alike; a run's time is the sum of its own turns (its steps and whatever the loop
does between them: a curve point's metrics, the gates' summary). The loop that starts second runs a few percent
slower or faster than the other (in CPU time too; the same whichever it is), so each repetition trains the pair twice,
each starting once, and takes the mean of the two. ``diagnostics_cost`` = (time_default - time_off) / time_default,
the median over the repetitions; ``diagnostics_cost_cpu`` the same of the loops' own threads' CPU time, which other
processes move less. A short untimed run first pays what a process pays once (imports, lazy initialisation, the
metrics' first use). ``--same`` trains the default against itself: its cost shows the measurement's own error.

The workload (the issue's model, at half the main job's batch size to keep the default run short): 26 categorical
features (one ID per row each; an item table of ``--item-rows`` rows and 25 more from 1,000 to 100,000 rows, IDs
Zipf-distributed as in tools/bench_train.py), 13 dense features, embedding dim 16, dense arch [64, 16], MMoE with 4
experts [256, 128] and heads [64], the default ESMM task set (ctr, cvr given ctr with IPS, rating, ctcvr = ctr x
cvr); ``--steps`` steps of ``--batch-size`` rows, one pass, row-wise Adagrad tables and Adam dense as the configs
train them.

``measure_diagnostics_cost`` is the function another tool imports to get the figure (tools/ on ``sys.path``)::

    >>> from bench_diagnostics import Workload, measure_diagnostics_cost  # doctest: +SKIP
    >>> measure_diagnostics_cost(Workload(batch_size=1024), repetitions=3)["diagnostics_cost"]  # doctest: +SKIP
    0.012

Example::

    .venv/bin/python tools/bench_diagnostics.py --out runs/bench_diagnostics.json  # about 3 minutes on 2 cores
    .venv/bin/python tools/bench_diagnostics.py --batch-size 2048 --steps 1000 --repetitions 3 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from bench_train_contenders import NUM_DENSE, table_sizes, zipf_ids
from common import quiet, save_rows
from torchrec_mtl.build import build_model
from torchrec_mtl.config import ModelConfig, ObjectiveConfig, TowerConfig, TrainingConfig
from torchrec_mtl.config.check import task_set
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.model import MultiTaskModel, MultiTaskTrain
from torchrec_mtl.protocols import Gated, find
from torchrec_mtl.tasks import MultiTaskObjective
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed, shard_model
from torchrec_mtl.train.loop import TrainSummary, make_pipeline, train

OFF = {"curve_every": 0, "gradient_cosine_every": 0}
RATING_OFFSET = 3.0  # the regression head starts at a typical rating, as the job's label-mean offset does


@dataclass(frozen=True)
class Workload:
    """The run each configuration trains: its size and model (the module docstring)."""

    steps: int = 2 * TrainingConfig().curve_every  # two curve points at the default curve_every, the cosine sampled
    batch_size: int = 512
    item_rows: int = 100_000
    embedding_dim: int = 16
    num_experts: int = 4
    expert_layer_sizes: Tuple[int, ...] = (256, 128)
    tower_layer_sizes: Tuple[int, ...] = (64,)
    warmup_steps: int = TrainingConfig().curve_every  # the untimed first run: one curve point's window and metrics

    def model(self) -> ModelConfig:
        tower = TowerConfig(
            kind="mmoe", num_experts=self.num_experts, expert_layer_sizes=list(self.expert_layer_sizes),
            tower_layer_sizes=list(self.tower_layer_sizes),
        )  # fmt: skip
        dense_arch = [64, self.embedding_dim]
        return ModelConfig(embedding_dim=self.embedding_dim, dense_arch_layer_sizes=dense_arch, tower=tower)


def default_diagnostics() -> Dict[str, int]:
    """The diagnostics a training run makes unless its config says otherwise: the config's defaults."""
    cosine_every = ObjectiveConfig().gradient_cosine_every
    return {"curve_every": TrainingConfig().curve_every, "gradient_cosine_every": cosine_every}


def make_log(workload: Workload, seed: int = 0) -> Tuple[Dict[str, int], EncodedLog]:
    """Table sizes and ``steps * batch_size`` rows in memory: Zipf IDs, Criteo-like dense counts, the ESMM labels
    (click 20%, conversion 20% of clicks, a rating on every row)."""
    rng = np.random.default_rng(seed)
    rows = workload.steps * workload.batch_size
    sizes = table_sizes(workload.item_rows, quick=False)
    sparse = np.stack([zipf_ids(rng, size, rows) for size in sizes.values()], axis=1)
    dense = np.log1p(rng.exponential(10.0, size=(rows, NUM_DENSE))).astype(np.float32)
    click = (rng.random(rows) < 0.2).astype(np.float32)
    conversion = click * (rng.random(rows) < 0.2).astype(np.float32)
    rating = rng.integers(1, 6, size=rows).astype(np.float32)
    return sizes, EncodedLog(dense, sparse, {"click": click, "conversion": conversion, "rating": rating})


AfterStep = Callable[[TrainSummary, Any], bool]


def prepare_run(
    env: DistributedEnv, sizes: Dict[str, int], log: EncodedLog, workload: Workload, diagnostics: Dict[str, int]
) -> Callable[[Optional[AfterStep]], TrainSummary]:
    """A fresh model (seed 0), sharded, with its pipeline and loader, built now; returned, the function that trains it
    one pass over ``log`` with ``diagnostics`` (``curve_every``, ``gradient_cosine_every``) through the training loop
    as the job calls it, with the ``after_step`` it is given."""
    torch.manual_seed(0)
    tasks = task_set(ObjectiveConfig())
    model = build_model(workload.model(), NUM_DENSE, sizes, task_names=tasks.tower_tasks)
    objective = MultiTaskObjective(
        tasks, {"rating": RATING_OFFSET}, gradient_cosine_every=diagnostics["gradient_cosine_every"]
    )
    training = TrainingConfig()
    sharded, optimizer = shard_model(
        MultiTaskTrain(model, objective), env, training.embedding_optimizer, training.embedding_lr, training.dense_lr,
        dense_optimizer_name=training.dense_optimizer,
    )  # fmt: skip
    pipeline = make_pipeline(sharded, optimizer, env.device)
    loader = BatchLoader(log, list(sizes), workload.batch_size, seed=0)
    curve_every = diagnostics["curve_every"]
    gated = find(sharded, Gated) if curve_every else None

    def run(after_step: Optional[AfterStep] = None) -> TrainSummary:
        return train(
            sharded, pipeline, loader, 1, show_progress=False, task_kinds=tasks.names, curve_every=curve_every,
            gated_tower=gated, after_step=after_step, device=env.device,
        )  # fmt: skip

    return run


def _cost(default_seconds: float, off_seconds: float) -> float:
    """The share of the default run's training time that the diagnostics took."""
    return (default_seconds - off_seconds) / default_seconds


class LockStep:
    """Two training loops, each in a thread of its own, taking turns one step at a time in the order a, b, b, a, ...
    (one running while the other waits), each timing its own turns; a finished loop's turns are skipped."""

    def __init__(self, first: str, second: str) -> None:
        self.pattern = [first, second, second, first]
        self.position = 0
        self.finished: set = set()
        self.seconds = {first: 0.0, second: 0.0}
        self.cpu_seconds = {first: 0.0, second: 0.0}  # the loop's own thread's CPU time (time.thread_time)
        self.condition = threading.Condition()
        self.resumed_at = self.resumed_cpu = 0.0

    def _turn(self) -> str:
        return self.pattern[self.position % len(self.pattern)]

    def wait_turn(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self._turn() == name)
        self.resumed_at, self.resumed_cpu = time.perf_counter(), time.thread_time()

    def end_turn(self, name: str, finished: bool = False) -> None:
        """Count the turn's time to ``name`` and hand the next turn on (to itself when the other has finished)."""
        elapsed, cpu = time.perf_counter() - self.resumed_at, time.thread_time() - self.resumed_cpu
        with self.condition:
            self.seconds[name] += elapsed
            self.cpu_seconds[name] += cpu
            if finished:
                self.finished.add(name)
            self.position += 1
            while len(self.finished) < len(self.seconds) and self._turn() in self.finished:
                self.position += 1
            self.condition.notify_all()

    def after_step(self, name: str) -> AfterStep:
        """The training loop's ``after_step``: end this turn, wait for the next; never stops the loop."""

        def hook(summary: TrainSummary, window: Any) -> bool:
            self.end_turn(name)
            self.wait_turn(name)
            return False

        return hook


def train_in_turns(
    trainers: Dict[str, Callable[[Optional[AfterStep]], TrainSummary]], first: str
) -> Dict[str, Tuple[TrainSummary, float, float]]:
    """Run the two ``trainers`` (name -> a function that trains with the ``after_step`` it is given; ``prepare_run``)
    in lock step, ``first`` first: each one's summary, and the seconds and CPU seconds of its own turns."""
    second = next(name for name in trainers if name != first)
    turns = LockStep(first, second)
    summaries: Dict[str, TrainSummary] = {}
    errors: List[BaseException] = []

    def run(name: str) -> None:
        turns.wait_turn(name)
        try:
            summaries[name] = trainers[name](turns.after_step(name))
        except BaseException as error:  # the other loop must not wait for a turn that never comes
            errors.append(error)
        finally:
            turns.end_turn(name, finished=True)

    threads = [threading.Thread(target=run, args=(name,), name=f"train-{name}") for name in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {name: (summaries[name], turns.seconds[name], turns.cpu_seconds[name]) for name in trainers}


def _pair_cost(runs: List[Dict[str, Any]], key: str) -> float:
    """The cost of one repetition: the mean of its two lock-step runs' costs (each run of the pair started once)."""
    costs = []
    for order in (True, False):
        default = next(r for r in runs if r["diagnostics"] == "default" and r["default_started"] is order)
        off = next(r for r in runs if r["diagnostics"] == "off" and r["default_started"] is order)
        costs.append(_cost(default[key], off[key]))
    return statistics.fmean(costs)


def measure_diagnostics_cost(
    workload: Workload = Workload(), repetitions: int = 2, progress: bool = False, same: bool = False
) -> Dict[str, Any]:
    """``diagnostics_cost``: the median over ``repetitions`` of (default - off) / default training time, the two
    trained in lock step twice per repetition, each starting once (the loop that starts second ran a few percent
    slower or faster, the same either way round; the mean of the two orders cancels it); ``diagnostics_cost_cpu``
    the same of the loops' own threads' CPU time (what other processes' load moves least); each run's samples/s and
    seconds, and what was run. ``same``: "off" is the default too (the measurement's own error). Call it in a
    process of its own: it opens a one-process group (gloo) if none is open, and runs on the CPU with torch's
    current thread count."""
    env = init_distributed(device=torch.device("cpu"))
    sizes, log = make_log(workload)
    configurations = {"default": default_diagnostics(), "off": default_diagnostics() if same else dict(OFF)}
    warmup = workload.warmup_steps
    prepare_run(env, sizes, log, workload, configurations["default"])(lambda summary, _: summary.steps >= warmup)
    runs: List[Dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    for repetition in range(repetitions):
        for first in ("default", "off"):
            trainers = {name: prepare_run(env, sizes, log, workload, config) for name, config in configurations.items()}
            for name, (summary, seconds, cpu_seconds) in train_in_turns(trainers, first).items():
                runs.append({"repetition": repetition, "diagnostics": name, "default_started": first == "default",
                             "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                             "samples_per_s": round(summary.samples / seconds, 1), "steps": summary.steps})  # fmt: skip
        if progress:
            shown = ", ".join(f"{r['diagnostics']} {r['samples_per_s']:,.0f} samples/s ({r['seconds']:.1f} s)"
                              for r in runs[-4:])  # fmt: skip
            print(f"repetition {repetition + 1}/{repetitions}: {shown}", flush=True)
    by_repetition = [[run for run in runs if run["repetition"] == repetition] for repetition in range(repetitions)]
    costs = [_pair_cost(pair, "seconds") for pair in by_repetition]
    cpu_costs = [_pair_cost(pair, "cpu_seconds") for pair in by_repetition]
    return {
        "diagnostics_cost": round(statistics.median(costs), 4),
        "cost_per_repetition": [round(cost, 4) for cost in costs],
        "diagnostics_cost_cpu": round(statistics.median(cpu_costs), 4),
        "cpu_cost_per_repetition": [round(cost, 4) for cost in cpu_costs],
        "samples_per_s": {name: [run["samples_per_s"] for run in runs if run["diagnostics"] == name]
                          for name in configurations},  # fmt: skip
        "train_seconds": {name: [run["seconds"] for run in runs if run["diagnostics"] == name]
                          for name in configurations},  # fmt: skip
        "runs": runs,
        "diagnostics": configurations,
        "config": {
            **dataclasses.asdict(workload),
            "repetitions": repetitions,
            "same": same,
            "threads": torch.get_num_threads(),
            "table_sizes": sizes,
            "tower_in_features": MultiTaskModel.tower_in_features(len(sizes), workload.embedding_dim),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            # 1-minute load averages around the timed runs: above the thread count, other processes shared the CPUs
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
    }


def summary_table(result: Dict[str, Any]) -> str:
    """Each configuration's median samples/s and training seconds, then the cost."""
    lines = [f"{'diagnostics':<13}{'runs':>5}{'median samples/s':>18}{'median train s':>16}  settings"]
    for name, settings in result["diagnostics"].items():
        rates, seconds = result["samples_per_s"][name], result["train_seconds"][name]
        shown = ", ".join(f"{key}={value}" for key, value in settings.items())
        lines.append(
            f"{name:<13}{len(rates):>5}{statistics.median(rates):>18,.0f}{statistics.median(seconds):>16.2f}  {shown}"
        )
    for key, label in (("cost_per_repetition", "diagnostics_cost"), ("cpu_cost_per_repetition", "(CPU time)")):
        each = ", ".join(f"{cost:.2%}" for cost in result[key])
        value = result["diagnostics_cost" if label == "diagnostics_cost" else "diagnostics_cost_cpu"]
        lines.append(f"{label:<17}{value:>7.2%}  (median of {len(result[key])} repetitions: {each})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    defaults = Workload()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per run (the log's rows "
                        f"over the batch size; default {defaults.steps})")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per step")
    parser.add_argument("--item-rows", type=int, default=defaults.item_rows, help="rows of the item table")
    parser.add_argument("--repetitions", type=int, default=2, help="repetitions, each of two lock-step runs")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="steps of the untimed run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--same", action="store_true", help="the default against itself: the measurement's error")
    parser.add_argument("--no-progress", action="store_true", help="no line per repetition")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workload = Workload(
        steps=args.steps, batch_size=args.batch_size, item_rows=args.item_rows, warmup_steps=args.warmup_steps
    )
    result = measure_diagnostics_cost(workload, args.repetitions, progress=not args.no_progress, same=args.same)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    save_rows(result, args.out, summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
