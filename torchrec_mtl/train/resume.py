"""Save and restore a whole training run: sharded model, both optimizers, data position, curve window and RNG.

``save_run`` and ``restore_run`` put a run's state through a ``Checkpointer``; ``CheckpointTrigger`` is the
``after_step`` hook of ``torchrec_mtl.train.loop.train`` that decides when to write one (every N steps, every T
seconds, or when SIGTERM asks the run to stop) and makes every rank decide the same.

Resuming at the world size that wrote the checkpoint continues exactly: the next batch is the one the interrupted run
would have taken, with the same optimizer state and random draws, so the final metrics are those of an uninterrupted
run (tests/test_checkpoint.py). At another world size the tables are resharded and training continues from the same
share of the epoch; the per-rank state (the curve window, RNG) starts afresh.

Example::

    >>> trigger = CheckpointTrigger(lambda summary, window: save_run(...), every_steps=1000)  # doctest: +SKIP
    >>> summary = train(sharded, pipeline, loader, epochs, after_step=trigger)  # doctest: +SKIP
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from torchrec_mtl.train.checkpoint import Checkpointer, CheckpointError, read_train_state, rng_state, set_rng_state
from torchrec_mtl.train.loop import CurveWindow, TrainSummary


def _run_state(sharded: nn.Module, optimizer: KeyedOptimizer) -> Dict[str, Any]:
    return {"model": sharded.state_dict(), "optimizer": optimizer.state_dict()}


def save_run(
    checkpointer: Checkpointer,
    sharded: nn.Module,
    optimizer: KeyedOptimizer,
    summary: TrainSummary,
    window: Optional[CurveWindow],
    global_batch_rows: int,
    config: Dict[str, Any],
    finished: bool = False,
    model_inputs: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the run's state at ``summary.steps`` (every rank calls it); ``config`` is the job config as a dict,
    ``model_inputs`` what rebuilding the model needs beside it (torchrec_mtl.inference.model_inputs)."""
    train_state = {
        "finished": finished,
        "global_batch_rows": global_batch_rows,
        "summary": summary.to_dict(),
        "config": config,
        "model_inputs": model_inputs,
    }
    rank_state = {"rng": rng_state(), "window": window.batches if window is not None else None}
    _initialise_lazy_state(optimizer)  # only before the first step: every checkpoint then has the same keys
    return checkpointer.save(summary.steps, _run_state(sharded, optimizer), train_state, rank_state)


def _initialise_lazy_state(optimizer: KeyedOptimizer) -> None:
    """Create the dense optimizers' state (Adam's moments appear at the first step) so the checkpoint's values have
    tensors to load into; the fused embedding optimizers hold theirs from the start."""
    optimizers = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [("", optimizer)]
    for _, part in optimizers:
        if isinstance(part, CombinedOptimizer):
            _initialise_lazy_state(part)
        elif not part.state and any(p.requires_grad for p in part.params.values()):
            # a zero-gradient step: Adam's update is then 0 (no weight decay here), the moments are created
            part.init_state()
            for param in part.params.values():
                param.grad = None


def restore_run(
    path: str | Path,
    sharded: nn.Module,
    optimizer: KeyedOptimizer,
    global_batch_rows: int,
) -> Tuple[TrainSummary, Optional[List], Dict[str, Any]]:
    """Load checkpoint ``path`` into ``sharded`` and ``optimizer``; return the summary to continue from, the curve
    window's batches (None when the checkpoint came from another world size) and the train state."""
    _initialise_lazy_state(optimizer)
    state = _run_state(sharded, optimizer)
    train_state, rank_state = Checkpointer(Path(path).parent).load(path, state)
    optimizer.load_state_dict(state["optimizer"])
    summary = TrainSummary.from_dict(train_state["summary"])
    if rank_state is None:
        # another world size: the same share of the epoch, in this world size's global batches
        summary.batch = summary.batch * train_state["global_batch_rows"] // global_batch_rows
        return summary, None, train_state
    set_rng_state(rank_state["rng"])
    return summary, rank_state["window"], train_state


def load_model_state(path: str | Path, sharded: nn.Module) -> Dict[str, Any]:
    """Only the model weights of checkpoint ``path`` into ``sharded`` (resharded as needed; optimizers and data
    position untouched: fine-tuning starts afresh from them); returns its train state."""
    path = Path(path)
    train_state, _ = Checkpointer(path.parent).load(path, {"model": sharded.state_dict()}, with_rank_state=False)
    return train_state


class CheckpointTrigger:
    """``after_step`` hook: writes a checkpoint every ``every_steps`` steps, every ``every_seconds`` seconds, and when
    SIGTERM arrives (then asks training to stop). Ranks agree through one small all-reduce per step, so a signal or a
    clock seen by one rank moves all of them at the same step.

    ``save(summary, window)`` writes the checkpoint; ``stop_requested`` tells afterwards whether SIGTERM stopped
    the run.
    """

    def __init__(
        self,
        save: Callable[[TrainSummary, Optional[CurveWindow]], Path],
        every_steps: int = 0,
        every_seconds: float = 0.0,
        handle_sigterm: bool = True,
    ) -> None:
        self.save, self.every_steps, self.every_seconds = save, every_steps, every_seconds
        self.last_saved_at = time.monotonic()
        self.stop_requested = False
        self.last_path: Optional[Path] = None
        self._signalled = False
        self._previous_handler = None
        if handle_sigterm:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def __call__(self, summary: TrainSummary, window: Optional[CurveWindow]) -> bool:
        due_by_time = self.every_seconds > 0 and time.monotonic() - self.last_saved_at >= self.every_seconds
        flags = torch.tensor([int(self._signalled), int(due_by_time)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, due = bool(flags[0]), bool(flags[1])
        due = due or stop or (self.every_steps > 0 and summary.steps % self.every_steps == 0)
        if due:
            self.last_path = self.save(summary, window)
            self.last_saved_at = time.monotonic()
        self.stop_requested = stop
        return stop


def resume_path(checkpointer: Checkpointer, resume: str) -> Optional[Path]:
    """The checkpoint to continue from: ``resume`` is ``never``, a folder, or ``auto`` (the newest checkpoint in the
    folder unless it marks a finished run)."""
    if resume == "never":
        return None
    if resume != "auto":
        read_train_state(resume)  # a clear error now for a folder that is no checkpoint
        return Path(resume)
    latest = checkpointer.latest()
    if latest is None or read_train_state(latest).get("finished"):
        return None
    return latest


__all__ = ["CheckpointError", "CheckpointTrigger", "restore_run", "resume_path", "save_run"]
