"""Write a synthetic log in the Criteo Kaggle / Terabyte layout, for benchmarks and format tests.

Each line is ``label <tab> I1..I13 <tab> C1..C26``, no header (the layout of ``configs/datasets/criteo_kaggle.yaml``
and ``criteo_terabyte.yaml``, and what torchrec's ``BinaryCriteoUtils.tsv_to_npys`` reads):

- ``label``: 0 or 1 (click rate 25%).
- ``I1..I13``: integers drawn from a log-normal (most small, a long tail), about 20% empty; ``I2`` also takes the
  values -1..-3 as the real logs do.
- ``C1..C26``: 8-character lowercase hex tokens drawn Zipf-like from a per-column vocabulary whose size (10 to 1e6)
  and tokens are fixed by the seed, about 10% empty. The vocabularies are built once, so all chunks share tokens.

The rows carry no signal: this is about bytes, parsing and throughput, not about what a model can learn. About
240 bytes a row; roughly 10 s per million rows on one core. The file is written in chunks of ``chunk_rows`` rows
(appended, so memory stays bounded); the output is the same for the same ``seed`` and ``chunk_rows``.

Example::

    >>> from torchrec_mtl.data.criteo_format import write_criteo_log
    >>> write_criteo_log("runs/bench/criteo_1000000.tsv", 1_000_000, seed=0)  # doctest: +SKIP
    240123456
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from torchrec_mtl.progress import bar_disabled

NUM_INTEGER = 13
NUM_CATEGORICAL = 26
CLICK_RATE = 0.25
INTEGER_EMPTY = 0.2
CATEGORICAL_EMPTY = 0.1
ZIPF_EXPONENT = 1.2
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_tokens(values: np.ndarray) -> pl.Series:
    """uint32 values as 8-character lowercase hex strings (vectorised ``f"{x:08x}"``)."""
    values = values.astype(np.uint32)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    nibbles = (values[:, None] >> shifts[None, :]) & np.uint32(0xF)
    chars = np.ascontiguousarray(_HEX_DIGITS[nibbles])  # [n, 8] uint8 ascii
    return pl.Series(chars.view("S8").ravel().astype("U8"), dtype=pl.String)


def _vocabularies(rng: np.random.Generator) -> list[pl.Series]:
    """One token list per categorical column; sizes log-uniform in [10, 1e6]."""
    vocabularies = []
    for _ in range(NUM_CATEGORICAL):
        size = int(10 ** rng.uniform(1, 6))
        vocabularies.append(_hex_tokens(rng.integers(0, 2**32, size, dtype=np.uint64)))
    return vocabularies


def _blank(series: pl.Series, empty: np.ndarray) -> pl.Series:
    """``series`` with the rows where ``empty`` is True replaced by the empty string."""
    return pl.select(pl.when(pl.lit(pl.Series(empty))).then(pl.lit("")).otherwise(pl.lit(series))).to_series()


def _chunk(rng: np.random.Generator, vocabularies: list[pl.Series], n: int) -> pl.DataFrame:
    columns = {"label": pl.Series((rng.random(n) < CLICK_RATE).astype(np.int8)).cast(pl.String)}
    for i in range(NUM_INTEGER):
        values = rng.lognormal(1.0, 2.0, n).astype(np.int64)
        if i == 1:  # I2: the real logs have a few negative values (-1, -2, -3)
            values -= rng.integers(0, 4, n) * (values == 0)
        columns[f"I{i + 1}"] = _blank(pl.Series(values).cast(pl.String), rng.random(n) < INTEGER_EMPTY)
    for i, vocabulary in enumerate(vocabularies):
        index = np.minimum(rng.zipf(ZIPF_EXPONENT, n) - 1, len(vocabulary) - 1)
        columns[f"C{i + 1}"] = _blank(vocabulary.gather(index), rng.random(n) < CATEGORICAL_EMPTY)
    return pl.DataFrame(columns)


def write_criteo_log(
    path: str | os.PathLike,
    num_rows: int,
    seed: int = 0,
    chunk_rows: int = 1_000_000,
    progress: bool = True,
) -> int:
    """Write ``num_rows`` Criteo-format lines to ``path`` (replaced if present) and return the file's size in bytes.

    Args:
        path: the TSV to write; its folder is created.
        num_rows: lines to write.
        seed: fixes the vocabularies and every value.
        chunk_rows: rows generated and appended at a time (memory scales with it, about 0.8 GiB at a million).
        progress: show a tqdm bar.
    """
    if num_rows < 0 or chunk_rows < 1:
        raise ValueError(f"num_rows must be >= 0 and chunk_rows >= 1, got {num_rows} and {chunk_rows}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocabularies = _vocabularies(rng)
    with (
        open(path, "wb") as out,
        tqdm(total=num_rows, unit="row", unit_scale=True, desc=f"write {path.name}", disable=bar_disabled(progress)) as bar,
    ):
        written = 0
        while written < num_rows:
            n = min(chunk_rows, num_rows - written)
            _chunk(rng, vocabularies, n).write_csv(out, separator="\t", include_header=False, quote_style="never")
            written += n
            bar.update(n)
    return path.stat().st_size
