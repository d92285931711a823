"""Read Criteo-style TSV logs into typed polars frames and encode them into model-ready arrays.

Encoding rules (the same for every split, fitted on the training split only):

- integer features: ``log(1 + max(x, 0))``; a missing value becomes 0 (the value of x = 0).
- categorical features: hex strings to indices through a vocabulary of the values seen at least ``min_count`` times
  in training; index 0 is shared by missing, rare and unseen values (cold items land there, so they get a trained
  "unknown" embedding rather than an untrained row).
- labels: float32, NaN where the field is empty (a missing label, e.g. a rating on an unclicked row).

Example::

    >>> schema = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")  # doctest: +SKIP
    >>> train = read_log("train.tsv", schema)  # doctest: +SKIP
    >>> encoder = CategoricalVocabulary.fit(train, schema, min_count=2)  # doctest: +SKIP
    >>> arrays = encode(train, schema, encoder)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

import numpy as np
import polars as pl

from torchrec_mtl.schema import DatasetSchema


class LogFormatError(ValueError):
    """A log that does not match its schema; the message names the file and what was expected."""


def read_log(path: str | os.PathLike, schema: DatasetSchema) -> pl.DataFrame:
    """Read one tab-separated log with no header, typed by ``schema``."""
    dtypes = {
        **{label: pl.Float32 for label in schema.labels},
        **{column: pl.Int64 for column in schema.integer},
        **{column: pl.Utf8 for column in schema.categorical},
    }
    try:
        frame = pl.read_csv(
            path,
            separator="\t",
            has_header=False,
            new_columns=schema.columns,
            schema_overrides=dtypes,
            quote_char=None,
        )
    except pl.exceptions.PolarsError as error:
        raise LogFormatError(
            f"{path}: does not match schema {schema.source} ({len(schema.columns)} tab-separated columns: "
            f"labels {list(schema.labels)}, {len(schema.integer)} integer, {len(schema.categorical)} categorical): "
            f"{str(error).splitlines()[0]}"
        ) from error
    if frame.width != len(schema.columns):
        raise LogFormatError(f"{path}: {frame.width} columns, schema {schema.source} expects {len(schema.columns)}")
    return frame


@dataclass
class CategoricalVocabulary:
    """Per-feature maps from raw categorical values to embedding rows (0 = missing, rare or unseen)."""

    values: Dict[str, pl.Series]

    @classmethod
    def fit(cls, frame: pl.DataFrame, schema: DatasetSchema, min_count: int = 1) -> "CategoricalVocabulary":
        values = {}
        for column in schema.categorical:
            counts = frame.get_column(column).drop_nulls().value_counts()
            kept = counts.filter(pl.col("count") >= min_count).get_column(column).sort()
            values[column] = kept
        return cls(values)

    def num_embeddings(self, column: str) -> int:
        return len(self.values[column]) + 1

    def lookup(self, column: str, raw: pl.Series) -> np.ndarray:
        known = self.values[column]
        return raw.replace_strict(
            known, pl.int_range(1, len(known) + 1, eager=True), default=0, return_dtype=pl.Int64
        ).to_numpy()


@dataclass
class EncodedLog:
    """A log as arrays: ``dense`` [N, I] float32, ``sparse`` [N, C] int64, ``labels`` name -> [N] float32.

    A missing label is NaN."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: Dict[str, np.ndarray]

    def __len__(self) -> int:
        return self.dense.shape[0]


def encode(frame: pl.DataFrame, schema: DatasetSchema, vocabulary: CategoricalVocabulary) -> EncodedLog:
    dense = (
        frame.select([pl.col(c).clip(lower_bound=0).log1p().fill_null(0.0).cast(pl.Float32) for c in schema.integer])
        .to_numpy()
        .astype(np.float32, copy=False)
    )
    sparse = np.column_stack([vocabulary.lookup(c, frame.get_column(c)) for c in schema.categorical])
    labels = {name: frame.get_column(name).cast(pl.Float32).to_numpy().astype(np.float32) for name in schema.labels}
    return EncodedLog(np.ascontiguousarray(dense), np.ascontiguousarray(sparse), labels)
