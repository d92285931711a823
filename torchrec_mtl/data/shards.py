"""Preprocessed logs on disk: the shards and metadata written by torchrec_mtl.data.preprocess, memory-mapped.

Example::

    >>> log = ShardedLog.open("runs/data/synthetic/shards")  # doctest: +SKIP
    >>> train = log.split("train")  # doctest: +SKIP
    >>> len(train), train[0].dense.shape, log.table_sizes["C2"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_mtl.data.preprocess import FORMAT_VERSION
from torchrec_mtl.schema import ListSpec


class ShardError(ValueError):
    """A shard folder or file that cannot be used; the message names it."""


@dataclass
class ListColumn:
    """A list feature's rows: ``values`` [N, max_length] table rows, of which row i uses its first ``lengths[i]``
    (0 after them), and ``lengths`` [N] int32. In memory or memory-mapped.

    Example::

        >>> column = ListColumn(np.array([[4, 5, 0], [0, 0, 0], [7, 0, 0]]), np.array([2, 0, 1], dtype=np.int32))
        >>> values, lengths = column.flat(np.array([2, 0, 1]))
        >>> values.tolist(), lengths.tolist()
        ([7, 4, 5], [1, 2, 0])
    """

    values: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return self.values.shape[0]

    def take(self, rows: np.ndarray) -> "ListColumn":
        return ListColumn(self.values[rows], self.lengths[rows])

    def flat(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The values of ``rows`` (in that order) one after another, and their lengths: one feature's part of a
        KeyedJaggedTensor."""
        lengths = np.asarray(self.lengths[rows])
        values = np.asarray(self.values[rows])
        return values[np.arange(values.shape[1]) < lengths[:, None]], lengths

    @staticmethod
    def concat(parts: Sequence["ListColumn"]) -> "ListColumn":
        return ListColumn(np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts]))


@dataclass
class EncodedLog:
    """Rows as arrays: ``dense`` [N, D] float32, ``sparse`` [N, C] integer rows of the single-ID categorical
    features, ``labels`` name -> [N] float32 (NaN = missing), ``keys`` column -> [N] int64 raw identity tokens
    (-1 = empty; user/item IDs, when the schema declares them), ``lists`` list feature -> its ``ListColumn``
    (when the schema declares list columns). In memory or memory-mapped."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: Dict[str, np.ndarray]
    keys: Dict[str, np.ndarray] = field(default_factory=dict)
    lists: Dict[str, ListColumn] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.dense.shape[0]

    def take(self, rows: np.ndarray) -> "EncodedLog":
        return EncodedLog(
            self.dense[rows],
            self.sparse[rows],
            {k: v[rows] for k, v in self.labels.items()},
            {k: v[rows] for k, v in self.keys.items()},
            {k: v.take(rows) for k, v in self.lists.items()},
        )

    def with_sparse(self, sparse: np.ndarray) -> "EncodedLog":
        """The same rows with other sparse columns (e.g. an extra lookup feature appended)."""
        if sparse.shape[0] != len(self):
            raise ValueError(f"sparse has {sparse.shape[0]} rows, the log {len(self)}")
        return replace(self, sparse=sparse)

    def with_labels(self, labels: Dict[str, np.ndarray]) -> "EncodedLog":
        """The same rows with other labels (shuffled or noisy ones)."""
        return replace(self, labels=labels)

    @staticmethod
    def concat(parts: Sequence["EncodedLog"]) -> "EncodedLog":
        if len(parts) == 1:
            part = parts[0]
            keys = {k: np.asarray(v) for k, v in part.keys.items()}
            lists = {k: ListColumn(np.asarray(v.values), np.asarray(v.lengths)) for k, v in part.lists.items()}
            return EncodedLog(np.asarray(part.dense), np.asarray(part.sparse), dict(part.labels), keys, lists)
        return EncodedLog(
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
            {k: np.concatenate([p.labels[k] for p in parts]) for k in parts[0].labels},
            {k: np.concatenate([p.keys[k] for p in parts]) for k in parts[0].keys},
            {k: ListColumn.concat([p.lists[k] for p in parts]) for k in parts[0].lists},
        )


class ShardedLog:
    """The metadata of a preprocessed folder, and its splits as lists of memory-mapped shards."""

    def __init__(self, root: Path, metadata: Dict) -> None:
        self.root, self.metadata = root, metadata

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ShardedLog":
        root = Path(root)
        path = root / "metadata.json"
        if not path.exists():
            partial = root.with_name(root.name + ".partial")
            hint = f" ({partial} exists: preprocessing stopped before the end)" if partial.exists() else ""
            raise ShardError(f"{root}: no metadata.json; not a preprocessed folder{hint}")
        try:
            metadata = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ShardError(f"{path}: corrupt metadata ({error})") from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{path}: format version {metadata.get('format_version')}, this code reads {FORMAT_VERSION}; "
                f"preprocess again"
            )
        return cls(root, metadata)

    @property
    def categorical_features(self) -> List[str]:
        return self.metadata["categorical_features"]

    @property
    def lists(self) -> Dict[str, ListSpec]:
        """The list features (in ``categorical_features`` order) and how they were read."""
        return {name: ListSpec(**spec) for name, spec in self.metadata["lists"].items()}

    @property
    def single_id_features(self) -> List[str]:
        """The categorical features of one ID per row: the ``sparse`` columns, in order."""
        return [f for f in self.categorical_features if f not in self.metadata["lists"]]

    @property
    def dense_features(self) -> List[str]:
        return self.metadata["dense_features"]

    @property
    def label_kinds(self) -> Dict[str, str]:
        return self.metadata["labels"]

    @property
    def key_columns(self) -> List[str]:
        return self.metadata["key_columns"]

    @property
    def table_sizes(self) -> Dict[str, int]:
        return self.metadata["table_sizes"]

    @property
    def splits(self) -> List[str]:
        return list(self.metadata["splits"])

    def rows(self, split: str) -> int:
        return self._split_meta(split)["rows"]

    def label_mean(self, split: str, label: str) -> Optional[float]:
        return self._split_meta(split)["label_means"][label]

    def _split_meta(self, split: str) -> Dict:
        if split not in self.metadata["splits"]:
            raise ShardError(f"{self.root}: no split {split!r}; it has {self.splits}")
        return self.metadata["splits"][split]

    def split(self, split: str) -> List[EncodedLog]:
        """The split's shards, memory-mapped, in written order; each checked against the metadata."""
        labels = list(self.label_kinds)
        shards = []
        for shard in self._split_meta(split)["shards"]:
            arrays = {}
            lists = self.lists
            parts = [
                ("dense", len(self.dense_features)),
                ("sparse", len(self.single_id_features)),
                ("labels", len(labels)),
            ]
            if self.key_columns:
                parts.append(("keys", len(self.key_columns)))
            if lists:
                parts.append(("lists", sum(spec.max_length for spec in lists.values())))
                parts.append(("list_lengths", len(lists)))
            for part, width in parts:
                path = self.root / split / f"{shard['name']}.{part}.npy"
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as error:
                    raise ShardError(f"{path}: unreadable shard ({error}); preprocess again") from None
                if array.shape != (shard["rows"], width):
                    raise ShardError(
                        f"{path}: shape {array.shape}, metadata says ({shard['rows']}, {width}); preprocess again"
                    )
                arrays[part] = array
            shards.append(
                EncodedLog(
                    arrays["dense"],
                    arrays["sparse"],
                    {n: arrays["labels"][:, i] for i, n in enumerate(labels)},
                    {n: arrays["keys"][:, i] for i, n in enumerate(self.key_columns)},
                    _list_columns(arrays, lists),
                )
            )
        return shards


def _list_columns(arrays: Dict[str, np.ndarray], lists: Dict[str, ListSpec]) -> Dict[str, ListColumn]:
    """Each list feature's view of a shard's ``lists`` (its max_length columns) and ``list_lengths`` (its column)."""
    columns, offset = {}, 0
    for i, (name, spec) in enumerate(lists.items()):
        columns[name] = ListColumn(
            arrays["lists"][:, offset : offset + spec.max_length], arrays["list_lengths"][:, i]
        )
        offset += spec.max_length
    return columns
