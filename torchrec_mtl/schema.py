"""Which column of a Criteo-style log is which: labels, integer features, categorical features, user and item IDs.

Files have no header: columns are, in order, the labels, the integer features, then the categorical features.

Example::

    >>> schema = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")  # doctest: +SKIP
    >>> schema.columns[:4]  # doctest: +SKIP
    ['click', 'conversion', 'rating', 'I1']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

LABEL_KINDS = ("binary", "regression")


class SchemaError(ValueError):
    """A schema file that cannot describe a log; the message names the file and the key."""


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    labels: Dict[str, str]
    integer: List[str]
    categorical: List[str]
    user_id: Optional[str] = None
    item_id: Optional[str] = None
    source: str = field(default="<in memory>", compare=False)

    def __post_init__(self) -> None:
        for label, kind in self.labels.items():
            if kind not in LABEL_KINDS:
                raise SchemaError(f"{self.source}: labels.{label}: expected one of {LABEL_KINDS}, got {kind!r}")
        seen = set()
        for column in self.columns:
            if column in seen:
                raise SchemaError(f"{self.source}: column {column!r} is declared twice")
            seen.add(column)
        for key in ("user_id", "item_id"):
            value = getattr(self, key)
            if value is not None and value not in self.categorical:
                raise SchemaError(f"{self.source}: {key}: {value!r} is not among the categorical columns")

    @property
    def columns(self) -> List[str]:
        return [*self.labels, *self.integer, *self.categorical]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "DatasetSchema":
        with open(path) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise SchemaError(f"{path}: expected a mapping at the top level")
        allowed = {"name", "labels", "integer", "categorical", "user_id", "item_id"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise SchemaError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"name", "labels", "integer", "categorical"} - set(raw))
        if missing:
            raise SchemaError(f"{path}: missing key(s) {missing}")
        return cls(**raw, source=str(path))
