"""Checkpoints of a sharded training run through torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a folder ``step-<step>`` holding:

- the DCP files of ``{"model": ..., "optimizer": ...}``: every rank writes its own shards of the sharded tables and
  of the fused optimizer's state, the replicated dense parameters and dense optimizer state are written once; DCP
  reshards on load, so a checkpoint written at one world size loads at another;
- ``rank-<r>.pt``: what each rank holds alone (RNG states, the training loop's metric window);
- ``train_state.json``: the data position, the training summary so far and the config that wrote it;
- ``manifest.json``, written last: the size and SHA-256 of every other file in the folder.

Reading a checkpoint runs no code and trusts no byte it has not checked: every load first verifies the folder
against its manifest (``verify_checkpoint``: a changed, missing or planted file is refused before anything in the
folder is deserialised), rank files are read with ``torch.load(weights_only=True)`` (tensors and plain containers
only), DCP's pickled ``.metadata`` and non-tensor values must unpickle with only DCP's metadata classes and plain values
(so a forged file runs nothing even when the manifest was rewritten to match it), and a model state whose floating
values are not all finite is refused after DCP fills it. Every refusal is a one-line CheckpointError naming the
checkpoint and the file or parameter. Ranks share the hashing (they share the folder: rank 0 renames what every rank
wrote) and refuse together.

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

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from torchrec_mtl.device import collective_device
from torchrec_mtl.errors import TrainingStopped  # noqa: F401 (raised here; importable from here, as before)
from torchrec_mtl.train.integrity import (
    MANIFEST,
    TRAIN_STATE,
    CheckpointError,
    WeightsOnlyLoadPlanner,
    check_metadata,
    failure_reason,
    first_non_finite,
    verification_error,
    verify_checkpoint,
    write_atomically,
    write_manifest,
)

_COMPLETE = re.compile(r"^step-(\d+)$")


def _rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_ok(ok: bool) -> bool:
    """Whether every rank's ``ok`` holds (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _raise_agreed(error: Optional[str], no_dist: bool = False) -> None:
    """Raise CheckpointError on every rank when any rank found ``error`` (a collective unless ``no_dist``), with the
    message of the lowest rank that found one: a rank that raised alone would leave the others waiting in DCP's
    next collective until the timeout."""
    if not no_dist and dist.is_initialized() and dist.get_world_size() > 1:
        found: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(found, error)
        error = next((message for message in found if message is not None), None)
    if error is not None:
        raise CheckpointError(error)


def rng_state() -> Dict[str, Any]:
    """Every random stream a training step may draw from (torch's on the host and, once CUDA is in use, on this
    process's GPU; numpy's global; Python's), as tensors and plain Python values only, so that
    ``torch.load(weights_only=True)`` reads it back: numpy's key array becomes an int64 tensor (torch's uint32 has
    too few operations to rely on), Python's state is already tuples of ints."""
    import random

    import numpy as np

    algorithm, key, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {
        "algorithm": str(algorithm),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # a host byte tensor, whatever the device
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # written on a GPU; a resume on the host has no such stream
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["algorithm"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
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
                write_atomically(partial / f"rank-{rank}.pt", _to_bytes(rank_state))
            except OSError as exc:
                error = exc
        if _all_ok(error is None) and rank == 0:
            try:
                document = {"step": step, "world_size": world_size, **train_state}
                write_atomically(partial / TRAIN_STATE, json.dumps(document, indent=2).encode())
                # last: every rank's DCP and rank files are written (the collective above), so it covers them all
                write_manifest(partial)
                if final.exists():  # the same step written again (a resumed run that stopped where it started)
                    shutil.rmtree(final)
                os.rename(partial, final)
            except OSError as exc:
                error = exc
        if not _all_ok(error is None):
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            reason = failure_reason(error) if error else "another rank failed"
            raise CheckpointError(f"checkpoint {final}: not written ({reason}); earlier checkpoints are intact")
        if rank == 0:
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return final

    def load(
        self,
        path: str | os.PathLike,
        state: Dict[str, Any],
        with_rank_state: bool = True,
        module: Optional[nn.Module] = None,
    ) -> Tuple[Dict[str, Any], Any]:
        """Read checkpoint ``path`` into ``state`` in place (resharding as needed); return its train state and this
        rank's saved rank state (None when it was written at another world size, whose ranks were other ranks, or
        when not ``with_rank_state``). ``module``: the model of ``state["model"]`` (``load_tensors``)."""
        path = Path(path)
        rank, world_size = _rank_and_world()
        # once, before any file of it is parsed; each rank hashes its share of the files (ranks share the folder:
        # they all wrote into it) and every rank refuses when any rank found a fault
        _raise_agreed(verification_error(path, rank, world_size))
        train_state = read_train_state(path)
        load_tensors(path, state, verify=False, module=module)
        rank_state = None
        if with_rank_state and train_state.get("world_size") == world_size:
            rank_file = path / f"rank-{rank}.pt"
            error = None
            try:  # tensors and plain containers only: a pickle that would run code is refused, not run
                rank_state = torch.load(rank_file, weights_only=True)
            except Exception as exc:
                error = f"{rank_file}: cannot be read ({failure_reason(exc)})"
            _raise_agreed(error)  # the same condition on every rank (the train state's world size): all call it
        return train_state, rank_state


def load_tensors(
    path: Path,
    state: Dict[str, Any],
    no_dist: bool = False,
    verify: bool = True,
    module: Optional[nn.Module] = None,
) -> None:
    """DCP's load of checkpoint ``path`` into ``state`` in place (``no_dist``: this process alone, whatever process
    group exists), or CheckpointError naming the checkpoint. ``verify``: check the folder against its manifest first
    (``verify_checkpoint``; False only where the caller has just done so). A model state (``state["model"]``) whose
    floating values are not all finite is refused, naming the first such parameter.

    ``module``: the model ``state["model"]`` is the state of; given, a model-only load from a checkpoint of the
    per-expert layout (before the expert banks) loads each bank from its experts' tensors (``_in_stored_layout``)."""
    path = Path(path)
    rank, world_size = (0, 1) if no_dist else _rank_and_world()
    if verify:  # DCP unpickles .metadata: never before it is checked
        _raise_agreed(verification_error(path, rank, world_size), no_dist)
    metadata = check_metadata(path)
    layout = _in_stored_layout(path, state, set(getattr(metadata, "state_dict_metadata", {})), module)
    try:
        dcp.load(layout, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner(), no_dist=no_dist)
    except _READ_OR_WRITE_FAILURES as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({failure_reason(exc)}); it is corrupt, truncated or from another model"
        ) from None
    if "model" in state:
        # a weight that is NaN or infinite makes every prediction NaN: refused here, not scored
        name = first_non_finite(state["model"])
        _raise_agreed(f"checkpoint {path}: non-finite values in {name}" if name else None, no_dist)


# A key of the per-expert layout (torchrec_mtl.modules.expert_bank.OLD_KEY under MMoE's ``experts`` or a PLE level's
# ``task_experts.<task>`` and ``shared_experts``): checkpoints written before the expert banks hold these instead.
_PER_EXPERT_KEY = re.compile(r"experts\.(?:[^.]+\.)?\d+\._mlp\.\d+\._linear\.(?:weight|bias)$")


def _in_stored_layout(path: Path, state: Dict[str, Any], stored: Set[str], module: Optional[nn.Module]) -> Dict:
    """``state`` as DCP is to fill it from checkpoint ``path``, whose keys are ``stored``: ``state`` itself, unless
    the checkpoint holds experts in the per-expert layout where ``state["model"]`` has expert banks. Then each bank's
    stacked tensors give way to views of them under the old keys (``ExpertBank.old_layout``), which DCP fills in
    place: the bank loads, and ``state["model"]`` holds it. Only a model-only load with its ``module`` can: with
    optimizer state (a resumed run; Adam's moments were per expert too) a CheckpointError says what can load it."""
    model = state.get("model")
    ours = {f"model.{key}" for key in model} if isinstance(model, dict) else set()
    if not any(_PER_EXPERT_KEY.search(key) and key not in ours for key in stored):
        return state
    if module is None or set(state) != {"model"}:
        raise CheckpointError(
            f"checkpoint {path}: written before the expert banks (it holds every expert's layers apart); its weights "
            "load for predict, evaluate, export and fine-tuning (finetune.checkpoint), but a run cannot resume from "
            "it (its optimizer state is per expert too): start a new run, or fine-tune from it"
        )
    from torchrec_mtl.modules.expert_bank import ExpertBank

    # each bank's keys in the state found by storage: the module's names for them carry DMP's wrappers, the state's
    # do not (the banks are dense: plain tensors there, not ShardedTensors)
    keys = {(value.data_ptr(), tuple(value.shape)): key for key, value in model.items() if type(value) is torch.Tensor}
    model = dict(model)
    for bank in (part for part in module.modules() if isinstance(part, ExpertBank)):
        key = keys.get((bank.weights[0].data_ptr(), tuple(bank.weights[0].shape)))
        if key is None or f"model.{key}" in stored:
            continue
        prefix = key[: -len("weights.0")]
        for layer in range(len(bank.layer_sizes)):
            del model[f"{prefix}weights.{layer}"], model[f"{prefix}biases.{layer}"]
        model.update(bank.old_layout(prefix))
    return {**state, "model": model}


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


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


__all__ = [
    "MANIFEST", "TRAIN_STATE", "CheckpointError", "Checkpointer", "TrainingStopped", "load_tensors", "read_train_state",
    "resolve_checkpoint", "rng_state", "set_rng_state", "verify_checkpoint", "write_manifest",
]  # fmt: skip
