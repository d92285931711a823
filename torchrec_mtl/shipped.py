"""The configs that ship with the package: the job configs, the sections they include (``parts/``) and the dataset
schemas (``datasets/``) of the clone's top-level ``configs/`` folder, which the wheel carries as
``torchrec_mtl/configs`` (pyproject.toml's package-dir). ``torchrec-mtl configs`` lists them with the first comment
line of each; ``torchrec-mtl configs --copy DIR`` writes them into ``DIR/configs/``, where a job runs as it would in
the clone (``cd DIR && torchrec-mtl train --config configs/mmoe_synthetic.yaml`` writes ``DIR/runs/main``).

Example::

    >>> [shipped.relative for shipped in shipped_files()][:2]
    ['mmoe_criteo_kaggle.yaml', 'mmoe_mind.yaml']
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Dict, List

from torchrec_mtl.outputs import OutputError, new_file

# The folders of configs/, each with what its files are.
SECTIONS = (
    ("", "job configs: torchrec-mtl train --config FILE"),
    ("parts", "sections that the job configs include"),
    ("datasets", "dataset schemas: data.schema in a job config, or preprocess --schema FILE"),
    ("spaces", "search spaces: torchrec-mtl tune --space FILE"),
)


@dataclasses.dataclass(frozen=True)
class ShippedFile:
    relative: str  # its path under configs/, e.g. "parts/training.yaml"
    source: Traversable
    description: str  # the first comment line of the file, without its "#"


def configs_root() -> Traversable:
    """The shipped configs folder: ``torchrec_mtl/configs`` in an installed wheel, else the clone's ``configs/`` beside
    the package (the package run from the clone, or installed in editable mode, whose import hook maps no data
    folder)."""
    packaged = resources.files("torchrec_mtl").joinpath("configs")
    if packaged.is_dir():
        return packaged
    clone = Path(__file__).resolve().parent.parent / "configs"
    if (clone / "datasets").is_dir():
        return clone
    raise FileNotFoundError(
        f"no shipped configs: neither {packaged} (an installed package) nor {clone} (a clone) is there"
    )


def describe(text: str) -> str:
    """The first comment line of a YAML file's text, without its ``#``; empty when it has none."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
    return ""


def shipped_files() -> List[ShippedFile]:
    """Every shipped YAML file, section by section (SECTIONS), by name within each."""
    root = configs_root()
    found = []
    for section, _ in SECTIONS:
        folder = root.joinpath(section) if section else root
        entries = sorted((entry for entry in folder.iterdir() if entry.is_file()), key=lambda entry: entry.name)
        for entry in entries:
            if entry.name.endswith(".yaml"):
                relative = f"{section}/{entry.name}" if section else entry.name
                found.append(ShippedFile(relative, entry, describe(entry.read_text(encoding="utf-8"))))
    return found


def listing() -> str:
    """The text of ``torchrec-mtl configs``: each section's files with their descriptions."""
    from torchrec_mtl import __version__

    files = shipped_files()
    width = max(len(shipped.relative) for shipped in files) + 2
    lines = [f"torchrec-mtl {__version__} ships these configs (in {configs_root()}); "
             "torchrec-mtl configs --copy DIR writes them into DIR/configs/"]  # fmt: skip
    for section, what in SECTIONS:
        lines += ["", f"{section + '/' if section else 'configs/'}: {what}"]
        for shipped in files:
            if shipped.relative.rpartition("/")[0] == section:
                lines.append(f"  {shipped.relative:<{width}}{shipped.description}".rstrip())
    return "\n".join(lines)


def _holds(path: Path, text: str) -> bool:
    """Whether the file ``path`` holds ``text`` (line endings aside)."""
    try:
        return path.read_text(encoding="utf-8") == text
    except UnicodeDecodeError:
        return False


def copy_configs(destination: str | os.PathLike, option: str = "--copy") -> Dict[str, object]:
    """Write every shipped file into ``destination/configs/`` (with ``parts/`` and ``datasets/``), each written beside
    its target and renamed into place (torchrec_mtl.outputs.new_file). A file already there with the same content is
    left as it is; one with other content (edited, from another version, or not ours) is never overwritten: the copy
    is then refused before anything is written, naming it. Other files there (a user's own configs) stay as they are.
    Returns the folder and the files written and left unchanged."""
    folder = Path(destination) / "configs"
    for path in (Path(destination), folder, *(folder / section for section, _ in SECTIONS if section)):
        if path.exists() and not path.is_dir():
            raise OutputError(f"{option}: {path} is a file; expected a folder")
    files = shipped_files()
    texts = {shipped.relative: shipped.source.read_text(encoding="utf-8") for shipped in files}
    unchanged, conflicts = [], []
    for shipped in files:
        target = folder / shipped.relative
        if target.is_dir() or (target.exists() and not _holds(target, texts[shipped.relative])):
            conflicts.append(target)
        elif target.exists():
            unchanged.append(shipped.relative)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise OutputError(
            f"{option}: {conflicts[0]}{more} already exists and is not the shipped file; nothing was written: copy "
            "into another folder, or move it away yourself"
        )
    written = []
    for shipped in files:
        if shipped.relative not in unchanged:
            with new_file(folder / shipped.relative, option=option) as handle:
                handle.write(texts[shipped.relative])
            written.append(shipped.relative)
    return {"folder": str(folder), "written": written, "unchanged": unchanged}
