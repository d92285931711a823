#!/usr/bin/env python3
"""One timed run of ours for tools/bench_peers.py, in its own process (so that its peak RSS is its own): our trainer
or our bare training step, on the workload of tools/bench_peers_workload.py. Writes one JSON result.

- ``trainer``: ``run_job`` (what ``torchrec-mtl train`` runs) on ``--config`` (a JSON config dict) with
  ``--override`` keys: preprocessing (reused: the shards are made before the timing), the sharded model, one pass of
  the training loop, the test rows. samples/s is the loop's own (``results.json``'s ``training.samples_per_s``: rows
  trained over the loop's seconds). Past ``--limit`` seconds from the call the run is stopped as a scheduler stops a
  job, with SIGTERM: the loop writes a checkpoint after the step in progress and stops, and samples/s comes from that
  checkpoint's training summary (no test AUCs then). The limit counts from the call, model building included, so a
  stopped run of ours trains for a little less than the limit.
- ``step``: forward, backward and optimizer step of the same sharded model through TrainPipelineSparseDist, as
  tools/bench_train_contenders.py steps ours: ``prepare_job``'s model and pipeline, ``pipeline.progress`` over
  ``--warmup`` + ``--steps`` batches of our training loader held in memory (the pipeline reads up to two ahead), the
  gradient-cosine diagnostic off (the step alone); the median of the timed steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench_peers_runner import peak_rss_bytes
from common import quiet


class Stopper:
    """Sends this process SIGTERM ``limit_s`` seconds after ``start()``, once training's own handler is installed
    (before it, SIGTERM would kill the process: the thread waits for the handler to change from ``placeholder``);
    keeps the peak RSS at that moment (the checkpoint written after it is not training)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s, self.done, self.signalled_rss = limit_s, threading.Event(), None
        signal.signal(signal.SIGTERM, self.placeholder)
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def placeholder(signum: int, frame: Any) -> None:
        """A SIGTERM outside training (before or after it) does nothing."""

    def start(self) -> None:
        if self.limit_s > 0:
            self.thread.start()

    def _run(self) -> None:
        if self.done.wait(self.limit_s):
            return
        while not self.done.is_set():
            if signal.getsignal(signal.SIGTERM) is not self.placeholder:
                self.signalled_rss = peak_rss_bytes()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self.done.set()


def stopped_summary(config: Any) -> Dict[str, Any]:
    """The training summary in the checkpoint a SIGTERM-stopped run wrote."""
    from torchrec_mtl.run.prepare import checkpoint_dir
    from torchrec_mtl.train.checkpoint import read_train_state, resolve_checkpoint

    return read_train_state(resolve_checkpoint(checkpoint_dir(config)))["summary"]


def trainer(config: Any, limit_s: float) -> Dict[str, Any]:
    """Our trainer's result (module docstring)."""
    import torch

    from torchrec_mtl.run import run_job
    from torchrec_mtl.train.checkpoint import TrainingStopped

    stopper = Stopper(limit_s)
    stopper.start()
    try:
        results = run_job(config)
    except TrainingStopped:
        stopper.stop()
        summary = stopped_summary(config)
        return {"samples": summary["samples"], "seconds": round(summary["seconds"], 3), "finished": False,
                "steps": summary["steps"], "samples_per_s": round(summary["samples"] / summary["seconds"], 1),
                "peak_rss_bytes": stopper.signalled_rss or peak_rss_bytes(),
                "threads": torch.get_num_threads()}  # fmt: skip
    stopper.stop()
    training = results["training"]
    return {
        "samples": training["steps"] * config.training.batch_size, "seconds": training["train_seconds"],
        "finished": True, "steps": training["steps"], "samples_per_s": training["samples_per_s"],
        "test_auc": {task: results["tasks"][task]["auc"] for task in ("ctr", "cvr", "ctcvr")},
        "job_seconds": training["total_seconds"], "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def step(config: Any, warmup: int, steps: int, limit_s: float) -> Dict[str, Any]:
    """Our bare step's result (module docstring)."""
    import torch

    from torchrec_mtl.run.prepare import prepare_job
    from torchrec_mtl.train.distributed import init_distributed

    job = prepare_job(config, init_distributed())
    loader = job.loader("train")
    loader.set_epoch(0)
    batches = list(itertools.islice(iter(loader), warmup + steps + 2))
    source = itertools.cycle(batches)
    job.sharded.train()
    began, times = time.perf_counter(), []
    for i in range(warmup + steps):
        started = time.perf_counter()
        job.pipeline.progress(source)
        if i >= warmup:
            times.append(time.perf_counter() - started)
        if limit_s > 0 and time.perf_counter() - began > limit_s and times:
            break
    median = statistics.median(times)
    return {"step_seconds": [round(t, 5) for t in times], "median_step_seconds": median,
            "samples_per_s": round(config.training.batch_size / median, 1), "peak_rss_bytes": peak_rss_bytes(),
            "threads": torch.get_num_threads()}  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=("trainer", "step"))
    parser.add_argument("--config", required=True, type=Path, help="a JSON config dict")
    parser.add_argument("--override", action="append", default=[], help="key.sub=value (repeatable)")
    parser.add_argument("--name", default="ours", help="the contender's name in the result")
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--limit", type=float, default=0.0, help="seconds at most (0: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (step mode; run_job sets its own)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    quiet()
    import torch

    from torchrec_mtl.config import load_config

    torch.set_num_threads(args.threads)
    # the bare step leaves the gradient-cosine diagnostic out: its extra backward passes are not the step's
    step_only = ["objective.gradient_cosine_every=0"] if args.mode == "step" else []
    config = load_config(raw=json.loads(args.config.read_text()), overrides=[*args.override, *step_only])
    started = time.perf_counter()
    if args.mode == "trainer":
        result = trainer(config, args.limit)
    else:
        result = step(config, args.warmup, args.steps, args.limit)
    result.update(contender=args.name, mode=args.mode, overrides=args.override, torch=torch.__version__,
                  wall_seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
