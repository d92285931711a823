"""Public datasets turned into multi-task logs: the one registry of dataset converters (``torchrec-mtl convert``).

A log already laid out as a schema describes needs no converter: its schema YAML (``configs/datasets/``) is the whole
dataset (``data.schema``). A dataset in another shape (ratings, impressions with click lists) gets a converter here
that writes ``train.tsv``, ``test.tsv``, ``items.tsv`` and ``meta.json`` in its schema's layout.

Example::

    >>> sorted(SOURCES)
    ['mind', 'movielens']
    >>> SOURCES["movielens"].schema
    'configs/datasets/movielens.yaml'
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict

from torchrec_mtl.data.mind import convert_mind
from torchrec_mtl.data.movielens import convert_movielens


@dataclass(frozen=True)
class Source:
    """A converter (``convert(source_dir, out_dir, **options) -> summary``), the schema of the log it writes and what
    its source folder must hold."""

    convert: Callable[..., Dict[str, Any]]
    schema: str
    expects: str


SOURCES: Dict[str, Source] = {
    "movielens": Source(
        convert_movielens, "configs/datasets/movielens.yaml", "ratings.csv, movies.csv and tags.csv (ml-latest-small)"
    ),
    "mind": Source(convert_mind, "configs/datasets/mind.yaml", "behaviors.tsv and news.tsv (a MIND folder)"),
}


def convert(name: str, source_dir: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> Dict[str, Any]:
    """Run converter ``name`` of ``SOURCES``; ``options`` it does not take are left out (e.g. ``seed`` for MIND,
    whose split is by time alone)."""
    if name not in SOURCES:
        raise ValueError(f"dataset {name!r}; allowed: {', '.join(SOURCES)}")
    converter = SOURCES[name].convert
    accepted = inspect.signature(converter).parameters
    return converter(source_dir, out_dir, **{k: v for k, v in options.items() if k in accepted and v is not None})
