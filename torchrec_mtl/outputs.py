"""Where a command may write, and how: nothing a run did not write itself is ever deleted or overwritten.

Every output (preprocessed shards, a training run's folder, an export, user and item vectors, predictions, a report,
a generated log) is one of four shapes, each with one function:

- ``new_folder``: a folder written whole (shards, export, vectors). It is written into a fresh temporary folder
  beside the target and renamed into place at the end, so a reader never sees half of it and two runs into one
  target never mix their files.
- ``claim_folder``: a folder that grows over a run (a run's ``out_dir``: log, checkpoints, results).
- ``new_file``: one file (predictions, a report), written beside the target and renamed into place.
- ``new_files``: files moved one by one into a folder that holds others too (a generated or converted log beside
  its shards and text cache), the file that marks the set complete last.

An existing target is replaced (or written into) only when it is recognisably ours: it carries the marker file
``.torchrec-mtl.json`` that every folder of ours gets, or (folders written before the marker existed) it holds
only names that its kind of output writes. Never when it holds anything else, and never when it is, or holds, one
of the run's inputs. A refusal is an ``OutputError`` that names the target and says why, before any work is done.

Example::

    >>> with new_folder("runs/data/shards", "shards", inputs=["runs/data/train.tsv"]) as work:  # doctest: +SKIP
    ...     (work / "metadata.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, TextIO

MARKER = ".torchrec-mtl.json"

# What each kind of output writes at its top level: a folder holding only these names (and no marker) is one of
# ours written before markers existed.
KNOWN_NAMES = {
    "shards": {"metadata.json", "rejects.tsv", "vocab", "train", "test", "validation"},
    "run": {
        "train.log", "results.json", "predictions.npz", "evaluation.json", "checkpoints", "report.html", "report",
        "tensorboard", "export", "vectors",
    },  # fmt: skip
    "export": {"model.pt", "serve.pt", "manifest.json"},
    "vectors": {"users.npz", "items.npz", "manifest.json"},
    "synthetic": {"train.tsv", "test.tsv", "items.tsv", "test_truth.tsv", "meta.json", "shards", "item_text.npz"},
    "converted": {"train.tsv", "test.tsv", "items.tsv", "meta.json", "shards", "item_text.npz"},
    "tune": {"study.db", "trials.tsv", "best.yaml"},  # and its trials' run folders, trial-NNN
    # "report": its figures' PNGs, declared by torchrec_mtl.report.page beside the figure list it draws
}


class OutputError(ValueError):
    """An output target that must not be written; the message names it and says why."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(path)))


def _inputs_inside(target: Path, inputs: Iterable[str | os.PathLike]) -> list:
    """The inputs that are ``target``, lie under it, or are folders that hold it (symbolic links followed): writing
    there would change what the run reads (a file inside a checkpoint fails its manifest)."""
    resolved = _resolved(target)
    found = []
    for item in inputs:
        path = _resolved(item)
        if path == resolved or resolved in path.parents or (path.is_dir() and path in resolved.parents):
            found.append(str(item))
    return found


def is_ours(folder: Path, kind: str) -> bool:
    """Whether ``folder`` (an existing folder) was written by this package as an output of ``kind``."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
        except (OSError, ValueError, AttributeError):
            return False
    names = {entry.name for entry in folder.iterdir()}
    known = KNOWN_NAMES.get(kind, set())
    # hidden leftovers of our own writers: .<name>.<random>.partial folders and .step-N.partial checkpoints
    names = {n for n in names if not (n.startswith(".") and n.endswith(".partial"))}
    return bool(names) and names <= known


def check_folder(target: Path, kind: str, inputs: Sequence, option: str) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{option}: {target} is a file; expected a folder for the {kind} output")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option}: {target} lies under {parent}, which is a file")
            break
    held = _inputs_inside(target, inputs)
    if held:
        raise OutputError(
            f"{option}: {target} is or holds an input of this run ({held[0]}); choose a folder of its own"
        )
    if target.is_dir() and any(target.iterdir()) and not is_ours(target, kind):
        found = sorted(entry.name for entry in target.iterdir())
        raise OutputError(
            f"{option}: {target} already holds files that torchrec-mtl did not write ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); choose an empty or new folder, or clear it yourself"
        )


def _mark(folder: Path, kind: str) -> None:
    from torchrec_mtl import __version__

    document = {"kind": kind, "written_by": f"torchrec-mtl {__version__}", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / MARKER).write_text(json.dumps(document) + "\n")


def _make_parent(target: Path, option: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{option}: cannot create {target.parent} ({error.strerror or error})") from None


@contextlib.contextmanager
def new_folder(
    target: str | os.PathLike,
    kind: str,
    inputs: Sequence[str | os.PathLike] = (),
    option: str = "--out",
    keep_on: tuple = (),
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends without an exception it is marked and
    renamed to ``target``, replacing a previous output of ours there. On an exception the temporary folder is removed,
    unless the exception is one of ``keep_on`` (e.g. a stop whose message points into the folder).

    Raises OutputError (before yielding) when ``target`` may not be written: see the module docstring."""
    target = Path(target)
    check_folder(target, kind, inputs, option)
    _make_parent(target, option)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as error:
        raise OutputError(f"{option}: cannot write in {target.parent} ({error.strerror or error})") from None
    try:
        yield work
        _mark(work, kind)
        _publish(work, target, kind, inputs, option)
    except BaseException as error:
        if not isinstance(error, keep_on):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _publish(work: Path, target: Path, kind: str, inputs: Sequence, option: str) -> None:
    """Rename ``work`` to ``target``; a previous output of ours there is moved aside first and removed after."""
    check_folder(target, kind, inputs, option)  # again: something may have appeared while we worked
    if not target.exists():
        try:
            os.rename(work, target)
            return
        except OSError:  # another run published first: replace its output, as if it had been there before
            check_folder(target, kind, inputs, option)
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(work, target)
    shutil.rmtree(old, ignore_errors=True)


def claim_folder(
    target: str | os.PathLike, kind: str, inputs: Sequence[str | os.PathLike] = (), option: str = "out_dir"
) -> Path:
    """Create ``target`` (or accept it when it is empty or ours) for a run that writes into it as it goes; mark it.
    Raises OutputError when it may not be written."""
    target = Path(target)
    check_folder(target, kind, inputs, option)
    try:
        target.mkdir(parents=True, exist_ok=True)
        if not (target / MARKER).exists():
            _mark(target, kind)
    except OSError as error:
        raise OutputError(f"{option}: cannot create {target} ({error.strerror or error})") from None
    return target


def _is_our_file(path: Path, first_line_prefix: Optional[str]) -> bool:
    if first_line_prefix is None:
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline(4096).startswith(first_line_prefix)
    except OSError:
        return False


@contextlib.contextmanager
def new_file(
    target: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] = (),
    option: str = "--out",
    ours_if_starts_with: Optional[str] = None,
) -> Iterator[TextIO]:
    """Yield a text handle on a temporary file beside ``target``, renamed to ``target`` when the block ends without
    an exception. An existing ``target`` is replaced only when its first line starts with ``ours_if_starts_with``
    (the header this kind of file of ours begins with) and it is no input of the run."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{option}: {target} is a folder; expected a file name")
    if _inputs_inside(target, inputs):
        raise OutputError(f"{option}: {target} is an input of this run; write the output to another file")
    if target.exists() and not _is_our_file(target, ours_if_starts_with):
        raise OutputError(
            f"{option}: {target} exists and is not a file torchrec-mtl wrote; choose a new name, or remove it yourself"
        )
    _make_parent(target, option)
    if not target.parent.is_dir():
        raise OutputError(f"{option}: {target} lies under {target.parent}, which is not a folder")
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as error:
        raise OutputError(f"{option}: cannot write in {target.parent} ({error.strerror or error})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def new_files(target: str | os.PathLike, kind: str, last: str, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder inside ``target`` (created or accepted as by ``claim_folder``); when the block ends
    without an exception, every file written there is moved into ``target`` one by one, ``last`` (the file that
    marks the set complete) after the others. Other files of ``target`` (a cache, shards) are left as they are."""
    folder = claim_folder(target, kind, option=option)
    work = Path(tempfile.mkdtemp(prefix=".new.", suffix=".partial", dir=folder))
    try:
        yield work
        for name in sorted((entry.name for entry in work.iterdir()), key=lambda name: name == last):
            os.replace(work / name, folder / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
