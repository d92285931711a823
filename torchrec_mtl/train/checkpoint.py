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

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 20  # bytes per read while hashing: checkpoints are far larger than memory allows reading whole
_COMPLETE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it."""


class TrainingStopped(RuntimeError):
    """SIGTERM stopped training after a checkpoint was written; running the same job again continues from it."""


def _rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ok(ok: bool) -> bool:
    """Whether every rank's ``ok`` holds (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=_collective_device())
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


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def rng_state() -> Dict[str, Any]:
    """Every random stream a training step may draw from (torch, numpy's global, Python's), as tensors and plain
    Python values only, so that ``torch.load(weights_only=True)`` reads it back: numpy's key array becomes an int64
    tensor (torch's uint32 has too few operations to rely on), Python's state is already tuples of ints."""
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
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
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
                _write_atomically(partial / f"rank-{rank}.pt", _to_bytes(rank_state))
            except OSError as exc:
                error = exc
        if _all_ok(error is None) and rank == 0:
            try:
                document = {"step": step, "world_size": world_size, **train_state}
                _write_atomically(partial / TRAIN_STATE, json.dumps(document, indent=2).encode())
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
        rank, world_size = _rank_and_world()
        # once, before any file of it is parsed; each rank hashes its share of the files (ranks share the folder:
        # they all wrote into it) and every rank refuses when any rank found a fault
        _raise_agreed(_verification_error(path, rank, world_size))
        train_state = read_train_state(path)
        load_tensors(path, state, verify=False)
        rank_state = None
        if with_rank_state and train_state.get("world_size") == world_size:
            rank_file = path / f"rank-{rank}.pt"
            error = None
            try:  # tensors and plain containers only: a pickle that would run code is refused, not run
                rank_state = torch.load(rank_file, weights_only=True)
            except Exception as exc:
                error = f"{rank_file}: cannot be read ({_reason(exc)})"
            _raise_agreed(error)  # the same condition on every rank (the train state's world size): all call it
        return train_state, rank_state


def _files(folder: Path) -> Iterator[Tuple[str, Path]]:
    """Every entry of ``folder`` but its manifest and folders (recursively; a link, to a folder too, is an entry,
    not followed), as (its path relative to ``folder`` with ``/``, its path), sorted."""
    found = []
    for root, folders, names in os.walk(folder):
        names += [name for name in folders if os.path.islink(os.path.join(root, name))]
        for name in names:
            file = Path(root, name)
            relative = file.relative_to(folder).as_posix()
            if relative != MANIFEST:
                found.append((relative, file))
    return iter(sorted(found))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json``: the size and SHA-256 of every other file in ``folder`` (recursively, by
    relative path); returns its path. ``save`` calls it last, after every rank's files are written."""
    folder = Path(folder)
    files = {relative: {"size": file.stat().st_size, "sha256": _sha256(file)} for relative, file in _files(folder)}
    document = {"format": _MANIFEST_FORMAT, "files": files}
    _write_atomically(folder / MANIFEST, json.dumps(document, indent=2).encode())
    return folder / MANIFEST


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check checkpoint ``path`` against its ``manifest.json`` before anything in it is deserialised: the manifest
    is there and valid, every file it lists is present with its size and SHA-256, and no other file is present;
    otherwise CheckpointError naming the checkpoint, the file and what is wrong with it. Reads every file once, in
    1 MiB pieces."""
    error = _verification_error(Path(path))
    if error is not None:
        raise CheckpointError(error)


def _verification_error(path: Path, share: int = 0, shares: int = 1) -> Optional[str]:
    """What ``verify_checkpoint`` finds wrong with ``path`` (None: nothing), hashing only the listed files whose
    index is ``share`` modulo ``shares`` (the presence and sizes of all of them are always checked: it is cheap)."""
    if not path.is_dir():
        return f"{path}: no such checkpoint folder"
    manifest = path / MANIFEST
    if not manifest.is_file():
        if not (path / TRAIN_STATE).exists():
            return f"{path}: not a checkpoint (no {TRAIN_STATE}, no {MANIFEST})"
        return f"checkpoint {path}: no {MANIFEST}: written by an older version or tampered with"
    try:
        listed = _manifest_files(json.loads(manifest.read_text()))
    except (OSError, ValueError) as exc:
        return f"checkpoint {path}: {MANIFEST}: not a valid manifest ({_reason(exc)})"
    present = dict(_files(path))
    for relative in present:
        if relative not in listed:
            return f"checkpoint {path}: {relative}: not listed in the manifest (a file added after it was written)"
    for relative, expected in listed.items():
        file = present.get(relative)
        if file is None:
            return f"checkpoint {path}: {relative}: missing"
        size = file.stat().st_size if file.is_file() else None
        if size != expected["size"]:
            return f"checkpoint {path}: {relative}: size mismatch ({size} bytes, the manifest says {expected['size']})"
    for index, (relative, expected) in enumerate(listed.items()):
        if index % shares == share and _sha256(present[relative]) != expected["sha256"]:
            return f"checkpoint {path}: {relative}: checksum mismatch (changed after it was written)"
    return None


def _manifest_files(document: Any) -> Dict[str, Dict[str, Any]]:
    """The ``files`` of a manifest document, checked for shape, in sorted order (every rank hashes the same share),
    or ValueError saying what is wrong with it."""
    if not isinstance(document, dict) or document.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"expected a JSON object with format {_MANIFEST_FORMAT}")
    files = document.get("files")
    if not isinstance(files, dict):
        raise ValueError("expected 'files': an object")
    for relative, entry in files.items():
        # a listed path that leaves the folder would make verification read a file outside the checkpoint
        if relative.startswith("/") or ".." in relative.split("/") or relative in ("", MANIFEST):
            raise ValueError(f"file {relative!r}: not a path inside the checkpoint")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        ):
            raise ValueError(f"file {relative!r}: expected an integer 'size' and a hex 'sha256'")
    return dict(sorted(files.items()))


def load_tensors(path: Path, state: Dict[str, Any], no_dist: bool = False, verify: bool = True) -> None:
    """DCP's load of checkpoint ``path`` into ``state`` in place (``no_dist``: this process alone, whatever process
    group exists), or CheckpointError naming the checkpoint. ``verify``: check the folder against its manifest first
    (``verify_checkpoint``; False only where the caller has just done so). A model state (``state["model"]``) whose
    floating values are not all finite is refused, naming the first such parameter."""
    path = Path(path)
    rank, world_size = (0, 1) if no_dist else _rank_and_world()
    if verify:  # DCP unpickles .metadata: never before it is checked
        _raise_agreed(_verification_error(path, rank, world_size), no_dist)
    _check_metadata(path)
    try:
        dcp.load(state, checkpoint_id=str(path), planner=_WeightsOnlyLoadPlanner(), no_dist=no_dist)
    except _READ_OR_WRITE_FAILURES as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({_reason(exc)}); it is corrupt, truncated or from another model"
        ) from None
    if "model" in state:
        # a weight that is NaN or infinite makes every prediction NaN: refused here, not scored
        name = _first_non_finite(state["model"])
        _raise_agreed(f"checkpoint {path}: non-finite values in {name}" if name else None, no_dist)


# What DCP's .metadata may name: its own metadata classes, tensor sizes, dtypes and layouts, paths. DCP reads the file
# with pickle.load, which would call whatever a forged file names (a manifest rewritten along with it passes the
# checksums): the same bytes are first unpickled here with only these allowed, so DCP's load creates nothing else.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only what DCP's metadata holds (``_METADATA_CLASSES``, torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which checkpoint metadata never holds")


def _check_metadata(path: Path) -> None:
    """CheckpointError unless DCP's ``.metadata`` of ``path`` unpickles with only ``_METADATA_CLASSES``."""
    file = path / ".metadata"
    try:
        with open(file, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        return  # DCP names the missing file itself
    except Exception as exc:  # a forged or damaged pickle raises anything its opcodes lead to
        raise CheckpointError(f"checkpoint {path}: .metadata: refused ({_reason(exc)})") from None


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a checkpoint's non-tensor values (DCP unpickles them with
    ``weights_only=False``) must first load with ``weights_only=True``: plain values and tensors, no code."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything else; the same bytes then load alike below
        value.seek(0)
        super().load_bytes(read_item, value)


def _first_non_finite(state_dict: Dict[str, Any]) -> Optional[str]:
    """The name of the first floating tensor of ``state_dict`` holding a NaN or infinity in this rank's part of it
    (a ShardedTensor's local shards, a DTensor's local tensor), or None."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    for name, value in state_dict.items():
        if isinstance(value, ShardedTensor):
            parts = [shard.tensor for shard in value.local_shards()]
        elif isinstance(value, DTensor):
            parts = [value.to_local()]
        elif isinstance(value, torch.Tensor):
            parts = [value]
        else:
            continue
        for part in parts:
            if (part.is_floating_point() or part.is_complex()) and not bool(torch.isfinite(part).all()):
                return name
    return None


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
    text = str(error)
    # torch.load(weights_only=True)'s refusal ends in a documentation link; the line naming what it refused is the one
    # to show (and not its advice to load the file with weights_only=False)
    refused = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\.?$)", text, re.MULTILINE)
    if refused:
        return f"refused by torch.load(weights_only=True): {refused.group(1)}"[:300]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return (last if ":" in last else f"{type(error).__name__}: {last}")[:300]


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()
