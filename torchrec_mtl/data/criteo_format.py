"""Write a synthetic log in the Criteo Kaggle / Terabyte layout, for benchmarks and format tests.

Each line is ``label <tab> I1..I13 <tab> C1..C26``, no header (the layout of ``configs/datasets/criteo_kaggle.yaml``
and ``criteo_terabyte.yaml``, and what torchrec's ``BinaryCriteoUtils.tsv_to_npys`` reads):

- ``label``: 0 or 1 (click rate 25%).
- ``I1..I13``: integers drawn from a log-normal (most small, a long tail), about 20% empty; ``I2`` also takes the
  values -1..-3 as the real logs do.
- ``C1..C26``: 8-character lowercase hex tokens drawn Zipf-like from a per-column vocabulary whose size (10 to 1e6)
  and tokens are fixed by the seed, about 10% empty. The vocabularies are built once, so all chunks share tokens.

With ``history_max`` > 0 each line ends in one more field, a list column (``history``, for list-column benchmarks):
0 to ``history_max`` tokens (uniform) of the largest column's vocabulary (``history_column``, the column a schema
lets it share), drawn Zipf-like as that column's, ``|``-separated.

The rows carry no signal: this is about bytes, parsing and throughput, not about what a model can learn. About
240 bytes a row (plus 9 per history token); roughly 10 s per million rows on one core. The file is written in chunks
of ``chunk_rows`` rows
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


def history_column(seed: int = 0) -> str:
    """The categorical column whose vocabulary the ``history`` tokens of ``write_criteo_log(..., seed)`` come from:
    the one with the most tokens."""
    vocabularies = _vocabularies(np.random.default_rng(seed))
    return f"C{1 + int(np.argmax([len(v) for v in vocabularies]))}"


def _history(rng: np.random.Generator, vocabulary: pl.Series, n: int, history_max: int) -> pl.Series:
    """``n`` ``|``-joined lists of 0..history_max tokens of ``vocabulary``, built as bytes (the tokens are all 8
    characters) rather than as n Python lists."""
    lengths = rng.integers(0, history_max + 1, n)
    index = np.minimum(rng.zipf(ZIPF_EXPONENT, int(lengths.sum())) - 1, len(vocabulary) - 1)
    tokens = np.frombuffer(vocabulary.gather(index).cast(pl.Binary).to_numpy().astype("S8").tobytes(), np.uint8)
    cells = np.full((len(index), 9), ord("|"), dtype=np.uint8)  # each token and the separator after it
    cells[:, :8] = tokens.reshape(-1, 8)
    text = cells.tobytes()
    ends = np.cumsum(lengths) * 9
    starts = ends - lengths * 9
    # the last token of a row has no separator after it (an empty row is the empty string)
    rows = [text[s : max(e - 1, s)].decode() for s, e in zip(starts.tolist(), ends.tolist())]
    return pl.Series(rows, dtype=pl.String)


def _chunk(
    rng: np.random.Generator, vocabularies: list[pl.Series], n: int, history_max: int = 0
) -> pl.DataFrame:
    columns = {"label": pl.Series((rng.random(n) < CLICK_RATE).astype(np.int8)).cast(pl.String)}
    for i in range(NUM_INTEGER):
        values = rng.lognormal(1.0, 2.0, n).astype(np.int64)
        if i == 1:  # I2: the real logs have a few negative values (-1, -2, -3)
            values -= rng.integers(0, 4, n) * (values == 0)
        columns[f"I{i + 1}"] = _blank(pl.Series(values).cast(pl.String), rng.random(n) < INTEGER_EMPTY)
    for i, vocabulary in enumerate(vocabularies):
        index = np.minimum(rng.zipf(ZIPF_EXPONENT, n) - 1, len(vocabulary) - 1)
        columns[f"C{i + 1}"] = _blank(vocabulary.gather(index), rng.random(n) < CATEGORICAL_EMPTY)
    if history_max > 0:  # drawn after the other columns: without it the stream (and the file) is as before
        largest = max(vocabularies, key=len)
        columns["history"] = _history(rng, largest, n, history_max)
    return pl.DataFrame(columns)


def write_criteo_log(
    path: str | os.PathLike,
    num_rows: int,
    seed: int = 0,
    chunk_rows: int = 1_000_000,
    progress: bool = True,
    history_max: int = 0,
) -> int:
    """Write ``num_rows`` Criteo-format lines to ``path`` (replaced if present) and return the file's size in bytes.

    Args:
        path: the TSV to write; its folder is created.
        num_rows: lines to write.
        seed: fixes the vocabularies and every value.
        chunk_rows: rows generated and appended at a time (memory scales with it, about 0.8 GiB at a million).
        progress: show a tqdm bar.
        history_max: > 0: a ``history`` list column of up to that many tokens ends each line (see the module).
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
            chunk = _chunk(rng, vocabularies, n, history_max)
            chunk.write_csv(out, separator="\t", include_header=False, quote_style="never")
            written += n
            bar.update(n)
    return path.stat().st_size
