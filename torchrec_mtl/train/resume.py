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
from torchrec_mtl.train.loop import CurveWindow, TrainSummary, agree_max


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
    grad_scaler: Optional[torch.amp.GradScaler] = None,
) -> Path:
    """Write the run's state at ``summary.steps`` (every rank calls it); ``config`` is the job config as a dict,
    ``model_inputs`` what rebuilding the model needs beside it (torchrec_mtl.run.prepare.PreparedJob.model_inputs),
    ``grad_scaler`` fp16's loss scale (the same on every rank: the gradients it checks are all-reduced)."""
    train_state = {
        "finished": finished,
        "global_batch_rows": global_batch_rows,
        "summary": summary.to_dict(),
        "config": config,
        "model_inputs": model_inputs,
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
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
    grad_scaler: Optional[torch.amp.GradScaler] = None,
) -> Tuple[TrainSummary, Optional[List], Dict[str, Any]]:
    """Load checkpoint ``path`` into ``sharded``, ``optimizer`` and fp16's ``grad_scaler``; return the summary to
    continue from, the curve window's batches (None when the checkpoint came from another world size) and the train
    state."""
    _initialise_lazy_state(optimizer)
    state = _run_state(sharded, optimizer)
    train_state, rank_state = Checkpointer(Path(path).parent).load(path, state)
    optimizer.load_state_dict(state["optimizer"])
    if grad_scaler is not None and train_state.get("grad_scaler"):
        grad_scaler.load_state_dict(train_state["grad_scaler"])
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
    train_state, _ = Checkpointer(path.parent).load(
        path, {"model": sharded.state_dict()}, with_rank_state=False, module=sharded
    )
    return train_state


class CheckpointTrigger:
    """``after_step`` hook: writes a checkpoint every ``every_steps`` steps, every ``every_seconds`` seconds, and when
    SIGTERM arrives (then asks training to stop). Ranks agree through one small all-reduce per step, so a signal or a
    clock seen by one rank moves all of them at the same step: the training loop's own per-step all-reduce carries
    ``local_flags`` and passes the agreed values in (``torchrec_mtl.train.loop.AfterStep``); called without them,
    the trigger reduces its flags itself.

    ``save(summary, window)`` writes the checkpoint; ``stop_requested`` tells afterwards whether SIGTERM stopped
    the run. A save that raises CheckpointError (``Checkpointer.save`` raises it on every rank together) is tried
    once more after ``retry_after_s`` seconds; when that fails too, CheckpointError "checkpoint step-N failed twice
    (<reason>); the last good checkpoint is <path>" stops training, the same on every rank: the newest complete one
    in ``checkpointer`` when given (so also one an earlier run wrote), else the last this trigger wrote.
    """

    def __init__(
        self,
        save: Callable[[TrainSummary, Optional[CurveWindow]], Path],
        every_steps: int = 0,
        every_seconds: float = 0.0,
        handle_sigterm: bool = True,
        checkpointer: Optional[Checkpointer] = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self.save, self.every_steps, self.every_seconds = save, every_steps, every_seconds
        self.checkpointer, self.retry_after_s = checkpointer, retry_after_s
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

    def local_flags(self) -> List[int]:
        """This rank's view after a step: [SIGTERM arrived, a checkpoint is due by the clock]."""
        due_by_time = self.every_seconds > 0 and time.monotonic() - self.last_saved_at >= self.every_seconds
        return [int(self._signalled), int(due_by_time)]

    def __call__(
        self, summary: TrainSummary, window: Optional[CurveWindow], agreed: Optional[List[int]] = None
    ) -> bool:
        """``agreed``: ``local_flags``' maximum over the ranks, when the caller reduced them (the training loop)."""
        if agreed is None:
            agreed = agree_max(self.local_flags())
        stop, due = bool(agreed[0]), bool(agreed[1])
        due = due or stop or (self.every_steps > 0 and summary.steps % self.every_steps == 0)
        if due:
            self.last_path = self._save_with_retry(summary, window)
            self.last_saved_at = time.monotonic()
        self.stop_requested = stop
        return stop

    def _save_with_retry(self, summary: TrainSummary, window: Optional[CurveWindow]) -> Path:
        """``save``, tried once more when it raises CheckpointError (every rank raises it together, so every rank
        retries together); a second failure raises CheckpointError naming the last good checkpoint."""
        name = f"step-{summary.steps:09d}"  # the checkpoint's folder name (Checkpointer.save)
        try:
            return self.save(summary, window)
        except CheckpointError as error:
            cause, _ = self._agreed_failure(error)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"warning: checkpoint {name} failed ({cause}); trying once more", flush=True)
        time.sleep(self.retry_after_s)
        try:
            return self.save(summary, window)
        except CheckpointError as error:
            cause, last = self._agreed_failure(error)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # the pipeline's started input exchange completes before every rank stops
            where = f"the last good checkpoint is {last}" if last is not None else "there is no good checkpoint yet"
            raise CheckpointError(f"checkpoint {name} failed twice ({cause}); {where}") from None

    def _agreed_failure(self, error: CheckpointError) -> Tuple[str, Optional[Path]]:
        """The same on every rank (a collective when distributed): why the save failed, in the words of the lowest
        rank that saw the fault itself (the others' Checkpointer.save says "another rank failed"), and the last good
        checkpoint, rank 0's (it renames checkpoints into place): the newest complete one in ``checkpointer``, else
        the last one this trigger wrote."""
        message = str(error)  # Checkpointer.save's "checkpoint <path>: not written (<cause>); earlier ... intact"
        _, opened, rest = message.partition(": not written (")
        cause, closed, _ = rest.rpartition("); earlier checkpoints are intact")
        cause = cause if opened and closed else message
        last = self.checkpointer.latest() if self.checkpointer is not None else self.last_path
        if dist.is_initialized() and dist.get_world_size() > 1:
            views: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(views, (cause, str(last) if last is not None else None))
            causes = [view[0] for view in views]
            cause = next((c for c in causes if c != "another rank failed"), causes[0])
            last = Path(views[0][1]) if views[0][1] is not None else None
        return cause, last


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
