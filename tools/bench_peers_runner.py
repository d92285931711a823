#!/usr/bin/env python3
"""One timed run of a peer for tools/bench_peers.py, in the peers' venv (it imports only the peers, torch, numpy and
scikit-learn, and tools/peer_runner.py for the peers' models): its trainer or its bare training step, on rows that
tools/bench_peers_workload.export_rows wrote. Writes one JSON result; its peak RSS is this process's own.

- ``trainer``: the peer's own training path over every training row once (DeepCTR-Torch: ``model.fit``; torch-rechub:
  ``MTLTrainer.train_one_epoch``; tools/peer_runner.py's DeepCTRPeer and RechubPeer: MMoE, CTR on every row and CVR
  on clicked rows), then its test AUCs (CTR, CVR on clicked rows, CTCVR). samples/s = training rows over the seconds
  from the call into the trainer to its return. Past ``--limit`` seconds the run stops at the next batch (a forward
  pre-hook on the model counts the batches and raises) and samples/s counts the batches it finished; no AUCs then.
- ``step``: forward, loss, backward and the optimizer step of the same model, in a plain loop over pre-made batches
  in memory (``steps.npz``), the loss as the peer's trainer builds it (its masked BCE, its regularisation term): the
  median of ``--steps`` timed steps after ``--warmup``, stopping early past ``--limit`` seconds.

Example::

    runs/bench_peers/venv/bin/python tools/bench_peers_runner.py --peer deepctr_torch --mode step \\
        --rows runs/bench_peers/export_peers --result /tmp/deepctr_step.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

PEERS = ("deepctr_torch", "torch_rechub")


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM: its own since exec, unlike a spawner's view of its child's
    ru_maxrss, which may hold the spawner's memory at fork time); ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TimeLimit(Exception):
    """Raised from inside a trainer at its time limit: the only way into a peer's ``fit`` loop from outside."""


class BatchClock:
    """A forward pre-hook counting a model's training forwards (one per batch) and raising TimeLimit at the first
    forward past ``limit_s`` seconds from ``start()``: the batches before it are the ones finished."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s, self.began, self.forwards, self.stopped_at = limit_s, 0.0, 0, 0.0

    def start(self) -> None:
        self.began = time.perf_counter()

    def __call__(self, module: Any, inputs: Any) -> None:
        if not module.training:
            return
        self.forwards += 1
        now = time.perf_counter()
        if self.limit_s > 0 and now - self.began > self.limit_s:
            self.stopped_at = now
            raise TimeLimit


def train_timed(peer: Any, train: Dict[str, Any], limit_s: float, batch_size: int) -> Dict[str, Any]:
    """One pass of ``peer``'s trainer over ``train``: the rows and seconds it finished, whether it finished."""
    clock = BatchClock(limit_s)
    handle = peer.model.register_forward_pre_hook(clock)
    clock.start()
    try:
        peer.train_epoch(train)
        seconds, samples, finished = time.perf_counter() - clock.began, len(train["ctr"]), True
    except TimeLimit:
        seconds, samples, finished = clock.stopped_at - clock.began, (clock.forwards - 1) * batch_size, False
    handle.remove()
    return {"samples": samples, "seconds": round(seconds, 3), "finished": finished,
            "samples_per_s": round(samples / seconds, 1) if seconds > 0 else 0.0}  # fmt: skip


def make_peer(name: str, meta: Dict[str, Any], seed: int) -> Any:
    """tools/peer_runner.py's DeepCTRPeer or RechubPeer, seeded."""
    import random

    import numpy as np
    import torch
    from peer_runner import DeepCTRPeer, RechubPeer

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return DeepCTRPeer(meta, seed) if name == "deepctr_torch" else RechubPeer(meta, seed)


def step_function(name: str, peer: Any, batches: List[Any]) -> Callable[[int], None]:
    """One training step of ``peer``'s model on batch ``i`` of ``batches`` (cycled): what the peer's trainer does
    per batch, without its bookkeeping (progress bars, running losses)."""
    from peer_runner import masked_bce

    model = peer.model
    model.train()
    if name == "deepctr_torch":
        optimizer = model.optim

        def loss_of(x: Any, y: Any) -> Any:  # BaseModel.fit: a summed loss, its regularisation, its aux loss
            return masked_bce(model(x), y, reduction="sum") + model.get_regularization_loss() + model.aux_loss
    else:
        optimizer, trainer = peer.trainer.optimizer, peer.trainer

        def loss_of(x: Any, y: Any) -> Any:  # MTLTrainer.train_one_epoch: the tasks' mean loss, its regularisation
            p = model(x)
            tasks = y.shape[1]
            return sum(masked_bce(p[:, i], y[:, i]) for i in range(tasks)) / tasks + trainer.reg_loss_fn(model)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        optimizer.zero_grad()
        loss_of(x, y).backward()
        optimizer.step()

    return step


def premade_batches(name: str, peer: Any, meta: Dict[str, Any], rows: Dict[str, Any]) -> List[Any]:
    """The step rows cut into batches as each peer's model takes them: DeepCTR-Torch one float tensor of every
    column in its ``feature_index`` order (what ``fit`` builds), torch-rechub a dict of column tensors."""
    import numpy as np
    import torch
    from peer_runner import as_inputs

    inputs = as_inputs(meta, rows)
    labels = np.stack([rows["ctr"], rows["cvr"]], axis=1).astype(np.float32)
    size, batches = meta["batch_size"], []
    for start in range(0, len(labels) - size + 1, size):
        part = slice(start, start + size)
        y = torch.from_numpy(labels[part])
        if name == "deepctr_torch":
            columns = [inputs[f][part].reshape(-1, 1) for f in peer.model.feature_index]
            batches.append((torch.from_numpy(np.concatenate(columns, axis=-1)).float(), y))
        else:
            batches.append(({f: torch.from_numpy(np.ascontiguousarray(c[part])) for f, c in inputs.items()}, y))
    return batches


def time_steps(step: Callable[[int], None], warmup: int, steps: int, limit_s: float) -> Dict[str, Any]:
    """Median seconds of ``steps`` timed steps after ``warmup`` untimed ones; past ``limit_s`` (0: none) no further
    step starts."""
    began, times = time.perf_counter(), []
    for i in range(warmup + steps):
        started = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - started)
        if limit_s > 0 and time.perf_counter() - began > limit_s and times:
            break
    median = statistics.median(times) if times else None
    return {"step_seconds": [round(t, 5) for t in times], "median_step_seconds": median}


def load_split(npz: Path, prefix: str) -> Dict[str, Any]:
    import numpy as np

    with np.load(npz) as data:
        return {part: data[f"{prefix}_{part}"] for part in ("dense", "sparse", "ctr", "cvr")}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The result of the asked run (module docstring)."""
    import torch

    torch.set_num_threads(args.threads)
    meta = json.loads((args.rows / "meta.json").read_text())
    meta["scratch"] = str(args.result.parent)  # torch-rechub's trainer wants a model_path; nothing is saved there
    started = time.perf_counter()
    result: Dict[str, Any] = {"contender": args.peer, "mode": args.mode, "threads": torch.get_num_threads(),
                              "torch": torch.__version__}  # fmt: skip
    if args.mode == "trainer":
        train = load_split(args.rows / "rows.npz", "train")
        peer = make_peer(args.peer, meta, args.seed)
        result.update(train_timed(peer, train, args.limit, meta["batch_size"]))
        result["peak_rss_bytes"] = peak_rss_bytes()  # before the test rows: the training pass's peak
        if result["finished"]:
            from peer_runner import task_aucs

            test = load_split(args.rows / "rows.npz", "test")
            p = peer.predict(test)
            result["test_auc"] = task_aucs(test, p[:, 0], p[:, 1])
    else:
        peer = make_peer(args.peer, meta, args.seed)
        batches = premade_batches(args.peer, peer, meta, load_split(args.rows / "steps.npz", "step"))
        timed = time_steps(step_function(args.peer, peer, batches), args.warmup, args.steps, args.limit)
        median = timed["median_step_seconds"]
        result.update(timed, samples_per_s=round(meta["batch_size"] / median, 1) if median else 0.0,
                      peak_rss_bytes=peak_rss_bytes())  # fmt: skip
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument("--mode", required=True, choices=("trainer", "step"))
    parser.add_argument("--rows", required=True, type=Path, help="the export folder (rows.npz, steps.npz, meta.json)")
    parser.add_argument("--result", required=True, type=Path, help="where to write the JSON result")
    parser.add_argument("--limit", type=float, default=0.0, help="seconds of training at most (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (step mode)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (step mode)")
    args = parser.parse_args(argv)
    result = run(args)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
