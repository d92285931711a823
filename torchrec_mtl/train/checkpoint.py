"""Checkpoints of a sharded training run through torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a folder ``step-<step>`` holding:

- the DCP files of ``{"model": ..., "optimizer": ...}``: every rank writes its own shards of the sharded tables and
  of the fused optimizer's state, the replicated dense parameters and dense optimizer state are written once; DCP
  reshards on load, so a checkpoint written at one world size loads at another;
- ``rank-<r>.pt``: what each rank holds alone (RNG states, the training loop's metric window);
- ``train_state.json``, written last: the data position, the training summary so far and the config that wrote it.

Every rank writes into ``.step-<step>.partial``; only when all ranks have finished does rank 0 rename it to
``step-<step>`` (a rename within one folder is atomic), so a checkpoint that a dying process left half-written is never
picked up: ``latest`` sees only complete folders. The ``keep`` newest complete checkpoints are kept; older ones are
removed only after a newer one is complete, so a failed write (a full disk) leaves the previous one intact.

Example::

    >>> checkpointer = Checkpointer("runs/main/checkpoints", keep=2)  # doctest: +SKIP
    >>> checkpointer.save(step, {"model": dmp.state_dict(), "optimizer": opt.state_dict()}, {"epoch": 0})  # doctest: +SKIP
    >>> state = {"model": dmp.state_dict(), "optimizer": opt.state_dict()}  # doctest: +SKIP
    >>> train_state, rank_state = checkpointer.load(checkpointer.latest(), state)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

TRAIN_STATE = "train_state.json"
_COMPLETE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it."""


class TrainingStopped(RuntimeError):
    """SIGTERM stopped training after a checkpoint was written; running the same job again continues from it."""


def _rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_ok(ok: bool) -> bool:
    """Whether every rank's ``ok`` holds (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def rng_state() -> Dict[str, Any]:
    """Every random stream a training step may draw from (torch, numpy's global, Python's)."""
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpointer:
    """Writes and finds the checkpoints of one run in ``directory``, keeping the ``keep`` newest.

    Every rank constructs it with the same folder and calls ``save`` and ``load`` together (they are collectives).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep: {keep}; allowed: at least 1")
        self.directory, self.keep = Path(directory), keep

    def complete(self) -> List[Path]:
        """The complete checkpoints in this folder, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _COMPLETE.match(p.name))]
        return [path for _, path in sorted(found) if (path / TRAIN_STATE).is_file()]

    def latest(self) -> Optional[Path]:
        complete = self.complete()
        return complete[-1] if complete else None

    def save(self, step: int, state: Dict[str, Any], train_state: Dict[str, Any], rank_state: Any = None) -> Path:
        """Write ``state`` (a dict of state dicts, sharded tensors included) with DCP, each rank's ``rank_state``
        beside it, then ``train_state`` (JSON); returns the complete checkpoint's folder. A failure on any rank
        removes the partial folder on every rank's behalf and raises CheckpointError on all of them."""
        rank, world_size = _rank_and_world()
        final = self.directory / f"step-{step:09d}"
        partial = self.directory / f".step-{step:09d}.partial"
        error: Optional[BaseException] = None
        try:
            if rank == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
        except OSError as exc:
            error = exc
        if _all_ok(error is None):
            try:
                dcp.save(state, checkpoint_id=str(partial))
            except _READ_OR_WRITE_FAILURES as exc:  # DCP raises on every rank when any rank fails
                error = exc
        if error is None:
            try:
                _write_atomically(partial / f"rank-{rank}.pt", _to_bytes(rank_state))
            except OSError as exc:
                error = exc
        if _all_ok(error is None) and rank == 0:
            try:
                document = {"step": step, "world_size": world_size, **train_state}
                _write_atomically(partial / TRAIN_STATE, json.dumps(document, indent=2).encode())
                if final.exists():  # the same step written again (a resumed run that stopped where it started)
                    shutil.rmtree(final)
                os.rename(partial, final)
            except OSError as exc:
                error = exc
        if not _all_ok(error is None):
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            reason = _reason(error) if error else "another rank failed"
            raise CheckpointError(f"checkpoint {final}: not written ({reason}); earlier checkpoints are intact")
        if rank == 0:
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return final

    def load(
        self, path: str | os.PathLike, state: Dict[str, Any], with_rank_state: bool = True
    ) -> Tuple[Dict[str, Any], Any]:
        """Read checkpoint ``path`` into ``state`` in place (resharding as needed); return its train state and this
        rank's saved rank state (None when it was written at another world size, whose ranks were other ranks, or
        when not ``with_rank_state``)."""
        path = Path(path)
        train_state = read_train_state(path)
        load_tensors(path, state)
        rank, world_size = _rank_and_world()
        rank_state = None
        if with_rank_state and train_state.get("world_size") == world_size:
            rank_file = path / f"rank-{rank}.pt"
            try:
                rank_state = torch.load(rank_file, weights_only=False)
            except Exception as exc:
                raise CheckpointError(f"{rank_file}: cannot be read ({_reason(exc)})") from None
        return train_state, rank_state


def load_tensors(path: Path, state: Dict[str, Any], no_dist: bool = False) -> None:
    """DCP's load of checkpoint ``path`` into ``state`` in place (``no_dist``: this process alone, whatever process
    group exists), or CheckpointError naming the checkpoint."""
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    except _READ_OR_WRITE_FAILURES as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({_reason(exc)}); it is corrupt, truncated or from another model"
        ) from None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` when it is a checkpoint (a ``step-N`` folder); for a run's checkpoints folder, its newest."""
    path = Path(path)
    if not (path / TRAIN_STATE).exists():
        return Checkpointer(path).latest() or path
    return path


def read_train_state(path: str | os.PathLike) -> Dict[str, Any]:
    """A checkpoint's ``train_state.json``, or CheckpointError naming what is wrong with it."""
    file = Path(path) / TRAIN_STATE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        document = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable train state ({type(exc).__name__}: {exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("step"), int):
        raise CheckpointError(f"{file}: expected a JSON object with an integer 'step'")
    return document


# DCP's CheckpointException derives from BaseException; it carries each failed rank's traceback
_READ_OR_WRITE_FAILURES = (Exception, dcp.api.CheckpointException)


def _reason(error: BaseException) -> str:
    """The root cause's last line (for DCP's exception: the failed rank's own exception), shortened."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return (last if ":" in last else f"{type(error).__name__}: {last}")[:300]


def _to_bytes(value: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()
