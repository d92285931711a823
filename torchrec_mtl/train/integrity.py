"""What makes a checkpoint folder safe to read: a manifest of every file's size and SHA-256, written last and checked
before anything in the folder is deserialised; DCP's pickled ``.metadata`` unpickled first with only DCP's own
classes allowed; non-tensor values loaded with ``weights_only=True``; weights that must be finite.

A manifest guards against damage (a bad disk or copy, a half transfer, an edit by mistake, a dropped-in pickle), not
against someone who can also rewrite it: load only checkpoints you or your pipeline wrote.

Example::

    >>> write_manifest("runs/main/checkpoints/step-000002343")  # doctest: +SKIP
    >>> verify_checkpoint("runs/main/checkpoints/step-000002343")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from torchrec_mtl.errors import CheckpointError  # noqa: F401 (raised here; importable from here, as before)

TRAIN_STATE = "train_state.json"


MANIFEST = "manifest.json"


_MANIFEST_FORMAT = 1


_HASH_CHUNK = 1 << 20  # bytes per read while hashing: checkpoints are far larger than memory allows reading whole


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


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
    write_atomically(folder / MANIFEST, json.dumps(document, indent=2).encode())
    return folder / MANIFEST


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check checkpoint ``path`` against its ``manifest.json`` before anything in it is deserialised: the manifest
    is there and valid, every file it lists is present with its size and SHA-256, and no other file is present;
    otherwise CheckpointError naming the checkpoint, the file and what is wrong with it. Reads every file once, in
    1 MiB pieces."""
    error = verification_error(Path(path))
    if error is not None:
        raise CheckpointError(error)


def verification_error(path: Path, share: int = 0, shares: int = 1) -> Optional[str]:
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
        return f"checkpoint {path}: {MANIFEST}: not a valid manifest ({failure_reason(exc)})"
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


def check_metadata(path: Path) -> Any:
    """DCP's ``.metadata`` of ``path`` (a ``Metadata``; None when the file is missing), or CheckpointError unless it
    unpickles with only ``_METADATA_CLASSES``."""
    file = path / ".metadata"
    try:
        with open(file, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        return None  # DCP names the missing file itself
    except Exception as exc:  # a forged or damaged pickle raises anything its opcodes lead to
        raise CheckpointError(f"checkpoint {path}: .metadata: refused ({failure_reason(exc)})") from None


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a checkpoint's non-tensor values (DCP unpickles them with
    ``weights_only=False``) must first load with ``weights_only=True``: plain values and tensors, no code."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything else; the same bytes then load alike below
        value.seek(0)
        super().load_bytes(read_item, value)


def first_non_finite(state_dict: Dict[str, Any]) -> Optional[str]:
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


def failure_reason(error: BaseException) -> str:
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
