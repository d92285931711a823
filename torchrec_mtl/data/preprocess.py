"""Stream Criteo-style logs (plain or .gz, one or many files) into memory-mappable binary shards.

The files are read sequentially in chunks of whole lines (gunzipped on the fly); polars' CSV reader and expressions
check and convert each chunk, two chunks at a time on threads. Not polars' lazy ``scan_csv``: it cannot say which
line of which file was bad, and a truncated .gz must be an error that names the file.

Every line read is either written to a split or rejected with a reason; the summary shows
``rows read = rows written + rows rejected``. The rules per column are the schema's (torchrec_mtl.schema); the row
checks, in the order they are tried (a row's reason is the first that fails):

========================  ==========================================================================================
reason                    what failed
========================  ==========================================================================================
``line too long``         more than ``max_line_bytes`` bytes (default 1 MiB) before the line end: skipped while
                          reading, never held whole (the value is its length; the raw line, its first 200 bytes)
``empty line``            nothing between two line ends
``too many fields``       more separators than the schema has columns
``too few fields``        fewer (unless the schema pads short rows and only categorical fields are missing)
``label missing``         an empty required label
``label not 0/1``         a binary label other than 0 or 1 (``2``, ``yes``, ``nan``)
``label not a number``    a regression label that is not a number finite in float32 (1e39 is not)
``integer not valid``     an integer feature that is not a base-10 integer within int64
``numeric not valid``     a numeric feature that is not a number finite in float32
``categorical not hex``   a ``hex`` categorical with other characters, a sign, or over 64 bits
``categorical not id``    a ``decimal`` categorical that is not a non-negative integer
========================  ==========================================================================================

Rejected rows go to ``rejects.tsv`` (file, line, reason, column, value, the raw line; in the last two backslash,
tab, CR and LF are written as ``\\\\``, ``\\t``, ``\\r``, ``\\n``), the first few are printed with
file:line, and ``max_bad_fraction`` stops the run once the rejected share of the rows read so far exceeds it.
Decoding is lenient: bytes that are not UTF-8 (and NUL bytes) become U+FFFD, which no numeric or hex check accepts.

Output (``out_dir``), written into a fresh hidden folder beside it and renamed at the end (torchrec_mtl.outputs), so a
half-written folder is never read and only earlier shards are ever replaced:

- ``<split>/part-NNNNN.{dense,sparse,labels}.npy``: float32 [n, dense], int32 [n, categorical] embedding rows,
  float32 [n, labels] with NaN for a missing optional label; ``np.load(..., mmap_mode="r")`` maps them.
- ``<split>/part-NNNNN.keys.npy``: int64 [n, key columns] raw tokens of the schema's user ID, item ID and item-text
  key columns (-1 when empty), when it declares any: embedding rows lose identity (rare and unseen tokens share row
  0), these keep it.
- ``vocab/<feature>.npy``: the sorted tokens of each ``min_count`` feature (token at position i -> row i + 1).
- ``rejects.tsv`` and ``metadata.json`` (schema, table sizes, splits with their shards, counts by reason, label means).

Example::

    >>> schema = DatasetSchema.from_yaml("configs/datasets/criteo_kaggle.yaml")  # doctest: +SKIP
    >>> summary = preprocess(schema, {"train": ["day_0.gz", "day_1.gz"], "test": ["day_2.gz"]}, "shards/")  # doctest: +SKIP
    >>> summary.rows_read == summary.rows_written + summary.rows_rejected  # doctest: +SKIP
    True
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import polars as pl
from tqdm import tqdm

from torchrec_mtl.outputs import new_folder
from torchrec_mtl.schema import DatasetSchema

FORMAT_VERSION = 2
# Every reason a row can be rejected for, as in the table above.
REASONS = (
    "line too long",
    "empty line",
    "too many fields",
    "too few fields",
    "label missing",
    "label not 0/1",
    "label not a number",
    "integer not valid",
    "numeric not valid",
    "categorical not hex",
    "categorical not id",
)
MISSING_TOKEN = -1
FLOAT32_MAX = float(np.finfo(np.float32).max)
_PARSE_THREADS = 2


class LogFormatError(ValueError):
    """A log that cannot be read at all (a header that does not match, a truncated .gz); names the file."""


class TooManyBadRows(ValueError):
    """The rejected share exceeded ``max_bad_fraction``; the message has the counts, examples and the rejects file."""


@dataclass
class Rejection:
    file: str
    line: int
    reason: str
    column: str
    value: str

    def __str__(self) -> str:
        where = (
            f" (column {self.column}: {self.value[:40]!r})" if self.column else f" ({self.value})" * bool(self.value)
        )
        return f"{self.file}:{self.line}: {self.reason}{where}"


@dataclass
class PreprocessSummary:
    rows_read: int = 0
    rows_accepted: int = 0  # checked and kept; all of them are in rows_written once the run ends
    rows_written: Dict[str, int] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    padded: int = 0
    examples: List[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: str = ""

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def total_written(self) -> int:
        return sum(self.rows_written.values())

    def text(self) -> str:
        per_split = ", ".join(f"{k} {v:,}" for k, v in self.rows_written.items())
        kept = f"written {self.total_written:,} ({per_split})" if self.seconds else f"accepted {self.rows_accepted:,}"
        lines = [
            f"rows read {self.rows_read:,} = {kept} + rejected {self.rows_rejected:,}"
            + (f"; padded short rows {self.padded:,}" if self.padded else ""),
        ]
        for reason, count in self.rejected.most_common():
            lines.append(f"  rejected: {reason}: {count:,}")
        for example in self.examples:
            lines.append(f"    e.g. {example}")
        if self.seconds:
            lines.append(f"  {self.rows_read / self.seconds:,.0f} rows/s over {self.seconds:.1f} s -> {self.out_dir}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Reading: complete lines in bounded chunks, plain or gzip, with exact line numbers.


def _open_bytes(path: Path):
    """The file and a stream of its bytes, gunzipped when it starts with the gzip magic number."""
    raw = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    buffered = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
    gzipped = buffered.peek(2)[:2] == b"\x1f\x8b"  # peek, not seek: pipes cannot seek
    return buffered, (gzip.GzipFile(fileobj=buffered) if gzipped else buffered)


MAX_LINE_BYTES = 1 << 20  # the default longest line read: longer ones are rejected as "line too long"
_TOO_LONG_HEAD = 200  # bytes of a line too long kept for rejects.tsv


@dataclass
class LineTooLong:
    """A line of more than ``limit`` bytes, skipped while it was read: an empty line stands in for it in its chunk
    (so the line numbers after it stay exact), and ChunkParser.parse rejects that line as "line too long"."""

    index: int  # of the stand-in among its chunk's lines (0: the first)
    length: int  # bytes before its b"\n"
    limit: int
    head: bytes  # its first bytes

    def value(self) -> str:
        return f"{self.length:,} bytes, limit {self.limit:,}"

    def raw_line(self) -> str:
        return self.head.decode("utf-8", "replace") + f"... ({self.length - len(self.head):,} more bytes)"


def read_chunks(
    path: Path, chunk_bytes: int, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[Tuple[bytes, int, List[LineTooLong]]]:
    """Yield (chunk of whole lines ending in b"\\n", bytes of the file consumed so far, the chunk's lines too long).

    Reads sequentially, so a named pipe works as well as a file (its progress then counts uncompressed bytes). A line
    of more than ``max_line_bytes`` bytes before its b"\\n" is counted as it streams by, never held whole, and an
    empty line stands in for it (see LineTooLong): a chunk is at most ``chunk_bytes + max_line_bytes + 1`` bytes."""
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes: expected at least 1, got {max_line_bytes}")
    raw, stream = _open_bytes(path)
    carry = b""  # the start of a line not ended yet: at most max_line_bytes bytes
    skipping: Optional[LineTooLong] = None  # a line not ended yet that is already too long: only counted
    consumed = 0
    with raw:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
                raise LogFormatError(
                    f"{path}: compressed data is truncated or corrupt after {consumed:,} bytes of it were read "
                    f"({type(error).__name__}: {error}); re-copy or re-compress it"
                ) from None
            if not block:
                break
            consumed = raw.tell() if stream is not raw else consumed + len(block)
            ended: Optional[LineTooLong] = None
            if skipping is not None:
                cut = block.find(b"\n")
                if cut < 0:
                    skipping.length += len(block)
                    continue
                skipping.length += cut
                ended, skipping, block = skipping, None, block[cut + 1 :]
            else:
                block = carry + block
            cut = block.rfind(b"\n")
            whole, carry = block[: cut + 1], block[cut + 1 :]
            if len(carry) > max_line_bytes:
                skipping, carry = LineTooLong(0, len(carry), max_line_bytes, carry[:_TOO_LONG_HEAD]), b""
            chunk, too_long = _skip_long_lines(whole, max_line_bytes)
            if ended is not None:
                chunk = b"\n" + chunk
                too_long = [ended, *(replace(t, index=t.index + 1) for t in too_long)]
            if chunk:
                yield chunk, consumed, too_long
        if skipping is not None:
            yield b"\n", consumed, [skipping]
        elif carry:
            yield carry + b"\n", consumed, []


def _skip_long_lines(chunk: bytes, max_line_bytes: int) -> Tuple[bytes, List[LineTooLong]]:
    """``chunk`` (whole lines) with an empty line in place of each line of more than ``max_line_bytes`` bytes."""
    if len(chunk) <= max_line_bytes + 1:
        return chunk, []
    ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    long_lines = np.flatnonzero(ends - starts > max_line_bytes).tolist()
    if not long_lines:
        return chunk, []
    pieces, too_long, position = [], [], 0
    for i in long_lines:
        start, end = int(starts[i]), int(ends[i])
        pieces.append(chunk[position:start])
        too_long.append(LineTooLong(i, end - start, max_line_bytes, chunk[start : start + _TOO_LONG_HEAD]))
        position = end  # its b"\n" stays
    pieces.append(chunk[position:])
    return b"".join(pieces), too_long


def drop_first_line(chunk: bytes, too_long: Sequence[LineTooLong]) -> Tuple[bytes, bytes, List[LineTooLong]]:
    """(the chunk's first line without its line end, the rest of the chunk, the rest's lines too long)."""
    first, _, rest = chunk.partition(b"\n")
    return first.rstrip(b"\r"), rest, [replace(t, index=t.index - 1) for t in too_long if t.index > 0]


@dataclass
class SplitChunk:
    """A chunk's lines as string fields (``field_0`` ...; null for an empty or absent field), with the field count
    and byte span of every line."""

    fields: pl.DataFrame
    n_fields: np.ndarray
    starts: np.ndarray
    ends: np.ndarray  # exclusive, before any CR

    def raw_line(self, chunk: bytes, i: int) -> str:
        return chunk[self.starts[i] : self.ends[i]].decode("utf-8", "replace")


def split_chunk(chunk: bytes, separator: str, n_columns: int) -> SplitChunk:
    """Split a chunk of whole lines into ``n_columns`` string fields per line.

    Field counts come from the bytes (numpy), the fields from polars' CSV reader without quoting; a line the reader
    would split differently (a carriage return inside a line) sends the chunk to a slower per-line path."""
    if b"\x00" in chunk:
        chunk = chunk.replace(b"\x00", "\ufffd".encode())
    data = np.frombuffer(chunk, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    # each line's span [start, next start) holds its own b"\n", which is no separator
    n_fields = np.add.reduceat((data == ord(separator)).view(np.uint8), starts, dtype=np.int32) + 1
    has_cr = (ends > starts) & (data[np.maximum(ends - 1, 0)] == 13)
    ends = ends - has_cr
    n_fields[ends == starts] = 0  # an empty line
    schema = {f"field_{i}": pl.String for i in range(n_columns)}
    fields = None
    if b"\r" not in chunk or chunk.count(b"\r") == int(has_cr.sum()):
        try:
            fields = pl.read_csv(
                io.BytesIO(chunk),
                has_header=False,
                separator=separator,
                quote_char=None,
                schema=schema,
                truncate_ragged_lines=True,
                missing_columns="insert",
                encoding="utf8-lossy",
            )
        except pl.exceptions.PolarsError:
            # e.g. a first line with more fields than the schema: polars refuses the chunk, the per-line path does not
            fields = None
        if fields is not None and fields.height != len(ends):
            fields = None
    if fields is None:
        lines = pl.Series(
            "line", [chunk[s:e].decode("utf-8", "replace") for s, e in zip(starts, ends)], dtype=pl.String
        )
        fields = (
            pl.DataFrame({"line": lines})
            .select(pl.col("line").str.split_exact(separator, n_columns - 1).alias("f"))
            .unnest("f")
            .select(pl.all().replace("", None))
        )
    return SplitChunk(fields, n_fields, starts, ends)


# ---------------------------------------------------------------------------------------------------------------------
# Checking and converting one chunk of lines.


def _finite_in_float32(value: pl.Expr) -> pl.Expr:
    """Finite once stored as float32 (the shards' type): 1e39 is finite in float64 but +inf in float32."""
    return (value.is_finite() & (value.abs() <= FLOAT32_MAX)).fill_null(False)


def _column_rules(
    schema: DatasetSchema, name: str, text: pl.Expr, value: pl.Expr
) -> Tuple[Optional[pl.Expr], Optional[pl.Expr], Optional[pl.Expr]]:
    """For one file column: (parse, is-bad, reason) expressions. ``parse`` turns the text into a typed value;
    ``is-bad`` and ``reason`` read the text and that parsed ``value``. All None for an ignored column."""
    empty = text.is_null() | (text == "")
    if name in schema.labels:
        spec = schema.labels[name]
        parse = text.cast(pl.Float64, strict=False)
        if spec.kind == "binary":
            bad_value, reason = ~value.is_in([0.0, 1.0]).fill_null(False), pl.lit("label not 0/1")
        else:
            bad_value, reason = ~_finite_in_float32(value), pl.lit("label not a number")
        if spec.optional:
            return parse, ~empty & bad_value, reason
        return parse, empty | bad_value, pl.when(empty).then(pl.lit("label missing")).otherwise(reason)
    if name in schema.integer:
        return text.str.to_integer(base=10, strict=False), ~empty & value.is_null(), pl.lit("integer not valid")
    if name in schema.numeric:
        parse = text.cast(pl.Float64, strict=False)
        return parse, ~empty & ~_finite_in_float32(value), pl.lit("numeric not valid")
    if name in schema.categorical:
        base, reason = (16, "categorical not hex") if schema.categorical_format == "hex" else (10, "categorical not id")
        # to_integer accepts a sign; tokens have none (a negative value is caught by value < 0)
        bad = ~empty & (value.is_null() | (value < 0).fill_null(False) | text.str.starts_with("+"))
        return text.str.to_integer(base=base, strict=False), bad, pl.lit(reason)
    return None, None, None


@dataclass
class ParsedChunk:
    line_numbers: np.ndarray  # of the accepted rows
    dense: np.ndarray
    sparse: np.ndarray  # int32 rows for hash features, 0 in columns still to be mapped through a vocabulary
    tokens: np.ndarray  # int64 [n, len(frequency features)] raw tokens, MISSING_TOKEN for empty
    keys: np.ndarray  # int64 [n, len(key columns)] raw tokens, MISSING_TOKEN for empty
    labels: np.ndarray
    rejections: List[Tuple[int, str, str, str, str]]  # (line, reason, column, value, raw line)
    padded: int
    lines: int


class ChunkParser:
    """Checks and converts lines whose fields are laid out as ``file_columns``: each field is parsed once.

    Every feature must be among ``file_columns``; a label may be absent (predict scores logs without labels): it is
    then missing (NaN) on every row."""

    def __init__(self, schema: DatasetSchema, file_columns: Sequence[str]) -> None:
        self.schema, self.file_columns = schema, list(file_columns)
        self.frequency_features = [f for f in schema.categorical if not schema.vocabulary_rule(f).is_hash]
        n = len(self.file_columns)
        index = {name: i for i, name in enumerate(self.file_columns)}
        absent = [c for c in [*schema.integer, *schema.numeric, *schema.categorical] if c not in index]
        if absent:
            raise ValueError(f"file columns {self.file_columns} lack the feature(s) {absent} of {schema.source}")
        # padding may only supply categorical fields: every label and dense field in the layout must be on the line
        required = [index[c] for c in [*schema.labels, *schema.integer, *schema.numeric] if c in index]
        last_required = max(required, default=-1)
        may_pad = pl.lit(schema.pad_short_rows) & (pl.col("n_fields") > last_required)
        self.row_problem = (
            pl.when(pl.col("n_fields") == 0)
            .then(pl.lit("empty line"))
            .when(pl.col("n_fields") > n)
            .then(pl.lit("too many fields"))
            .when((pl.col("n_fields") < n) & ~may_pad)
            .then(pl.lit("too few fields"))
        )
        self.padded = pl.col("n_fields") < n
        self.parses, checks = [], []
        for i, name in enumerate(self.file_columns):
            text, value = pl.col(f"field_{i}"), pl.col(f"v_{name}")
            parse, bad, reason = _column_rules(schema, name, text, value)
            if parse is not None:
                self.parses.append(parse.alias(f"v_{name}"))
                checks.append((name, text, bad, reason))
        self.any_bad = pl.any_horizontal([bad for _, _, bad, _ in checks])
        self.reason = pl.coalesce([pl.when(bad).then(reason) for _, _, bad, reason in checks])
        self.bad_column = pl.coalesce([pl.when(bad).then(pl.lit(name)) for name, _, bad, _ in checks])
        self.bad_value = pl.coalesce([pl.when(bad).then(text) for _, text, bad, _ in checks])

        def value(name: str) -> pl.Expr:
            return pl.col(f"v_{name}")

        self.dense_exprs = [
            value(c).fill_null(0).clip(lower_bound=0).cast(pl.Float64).log1p().cast(pl.Float32) for c in schema.integer
        ] + [value(c).fill_null(0.0).cast(pl.Float32) for c in schema.numeric]
        self.hash_columns = [i for i, f in enumerate(schema.categorical) if schema.vocabulary_rule(f).is_hash]
        self.sparse_exprs = [
            (1 + value(f) % (schema.vocabulary_rule(f).hash_size - 1)).fill_null(0).cast(pl.Int32).alias(f"s{i}")
            for i, f in ((i, schema.categorical[i]) for i in self.hash_columns)
        ]
        self.token_exprs = [
            value(f).fill_null(MISSING_TOKEN).alias(f"t{i}") for i, f in enumerate(self.frequency_features)
        ]
        self.key_exprs = [value(f).fill_null(MISSING_TOKEN).alias(f"k{i}") for i, f in enumerate(schema.key_columns)]
        # An empty optional label parses to null: NaN marks it missing (and every row of a label not in the layout).
        self.label_exprs = [
            (value(c).fill_null(float("nan")) if c in index else pl.repeat(float("nan"), pl.len()))
            .cast(pl.Float32)
            .alias(f"l{i}")
            for i, c in enumerate(schema.labels)
        ]

    def parse(self, chunk: bytes, first_line: int, too_long: Sequence[LineTooLong] = ()) -> ParsedChunk:
        """Check and convert a chunk of whole lines whose first line is number ``first_line`` of its file.

        ``too_long``: the chunk's lines that read_chunks skipped (empty stand-ins), rejected as "line too long"."""
        split = split_chunk(chunk, self.schema.separator, len(self.file_columns))
        frame = split.fields.with_columns(
            pl.Series("n_fields", split.n_fields),
            pl.int_range(first_line, first_line + len(split.n_fields), dtype=pl.Int64).alias("line_no"),
            *self.parses,
        )
        frame = frame.with_columns(self.row_problem.alias("row_problem"))
        frame = frame.with_columns((pl.col("row_problem").is_not_null() | self.any_bad).alias("rejected"))
        rejected = frame.filter(pl.col("rejected"))
        rejections = []
        if rejected.height:
            described = rejected.select(
                pl.col("line_no"),
                pl.coalesce(pl.col("row_problem"), self.reason).alias("reason"),
                pl.when(pl.col("row_problem").is_null()).then(self.bad_column).otherwise(pl.lit("")).alias("column"),
                pl.when(pl.col("row_problem").is_null())
                .then(self.bad_value)
                .when(pl.col("n_fields") > 0)
                .then(pl.format("{} fields, the schema has {}", pl.col("n_fields"), pl.lit(len(self.file_columns))))
                .otherwise(pl.lit(""))
                .alias("value"),
            )
            rejections = [
                (int(n), r, c or "", v or "", split.raw_line(chunk, int(n) - first_line))
                for n, r, c, v in described.iter_rows()
            ]
        stand_ins = {first_line + t.index: t for t in too_long}
        for k, (n, *_) in enumerate(rejections if stand_ins else ()):
            if n in stand_ins:  # an empty line, so always rejected
                t = stand_ins.pop(n)
                rejections[k] = (n, "line too long", "", t.value(), t.raw_line())
        assert not stand_ins, f"lines {sorted(stand_ins)} too long but not empty stand-ins"
        kept = frame.filter(~pl.col("rejected"))
        rows = kept.height
        return ParsedChunk(
            line_numbers=kept.get_column("line_no").to_numpy(),
            dense=_matrix(kept, self.dense_exprs, np.float32, rows),
            sparse=self._sparse(kept),
            tokens=_matrix(kept, self.token_exprs, np.int64, rows),
            keys=_matrix(kept, self.key_exprs, np.int64, rows),
            labels=_matrix(kept, self.label_exprs, np.float32, rows),
            rejections=rejections,
            padded=int(kept.select(self.padded.sum()).item()) if self.schema.pad_short_rows else 0,
            lines=frame.height,
        )

    def _sparse(self, kept: pl.DataFrame) -> np.ndarray:
        """Rows of the hashed features; the vocabulary features' columns stay 0 until their vocabulary exists."""
        if len(self.hash_columns) == len(self.schema.categorical):
            return _matrix(kept, self.sparse_exprs, np.int32, kept.height)
        sparse = np.zeros((kept.height, len(self.schema.categorical)), dtype=np.int32)
        if self.hash_columns:
            sparse[:, self.hash_columns] = _matrix(kept, self.sparse_exprs, np.int32, kept.height)
        return sparse


def _matrix(frame: pl.DataFrame, exprs: List[pl.Expr], dtype: type, rows: int) -> np.ndarray:
    if not exprs:
        return np.zeros((rows, 0), dtype=dtype)
    return np.ascontiguousarray(frame.select(exprs).to_numpy().astype(dtype, copy=False))


# ---------------------------------------------------------------------------------------------------------------------
# Splits, shards, vocabularies.


def _uniform(seed: int, file_index: int, line_numbers: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per (seed, file, line), independent of chunking (splitmix64)."""
    with np.errstate(over="ignore"):
        x = line_numbers.astype(np.uint64) + np.uint64((seed * 1_000_003 + file_index) & 0xFFFFFFFF) * np.uint64(
            0x9E3779B97F4A7C15
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _TokenCounter:
    """Token counts of the ``min_count`` features over the training split, merged now and then to bound memory."""

    def __init__(self, features: List[str]) -> None:
        self.features = features
        self.pending: Dict[str, List[pl.DataFrame]] = {f: [] for f in features}

    def count(self, tokens: np.ndarray) -> List[pl.DataFrame]:
        """Counts of each feature's tokens in ``tokens`` (thread-safe: runs beside parsing)."""
        frame = pl.DataFrame(tokens, schema=[f"t{i}" for i in range(len(self.features))])
        return [
            frame.select(pl.col(f"t{i}").alias("token"))
            .filter(pl.col("token") != MISSING_TOKEN)
            .group_by("token")
            .len()
            for i in range(len(self.features))
        ]

    def add(self, counts: List[pl.DataFrame]) -> None:
        for feature, frame in zip(self.features, counts, strict=True):
            self.pending[feature].append(frame)
            if len(self.pending[feature]) >= 16:
                self.pending[feature] = [self._merge(feature)]

    def _merge(self, feature: str) -> pl.DataFrame:
        frames = self.pending[feature]
        if not frames:
            return pl.DataFrame({"token": [], "len": []}, schema={"token": pl.Int64, "len": pl.UInt32})
        return pl.concat(frames).group_by("token").agg(pl.col("len").sum())

    def vocabulary(self, feature: str, min_count: int) -> np.ndarray:
        counts = self._merge(feature)
        return np.sort(counts.filter(pl.col("len") >= min_count).get_column("token").to_numpy())


def _tokens_to_rows(tokens: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Row of each token in ``vocabulary`` (sorted): position + 1, or 0 for missing, rare and unseen tokens."""
    position = np.searchsorted(vocabulary, tokens)
    found = position < len(vocabulary)
    found[found] &= vocabulary[position[found]] == tokens[found]
    return np.where(found, position + 1, 0).astype(np.int32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _describe_files(files_by_split: Dict[str, Sequence[str | os.PathLike]]) -> List[Dict]:
    described = []
    for split, files in files_by_split.items():
        for path in files:
            stat = os.stat(path)
            described.append({"path": str(path), "split": split, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return described


def input_fingerprint(
    schema: DatasetSchema, files_by_split: Dict[str, Sequence[str | os.PathLike]], **split_options
) -> Dict:
    """What preprocessing depends on: the schema's rules, the files (size and mtime) and the split options."""
    return {
        "format_version": FORMAT_VERSION,
        "schema": schema.fingerprint(),
        "inputs": _describe_files(files_by_split),
        **split_options,
    }


class _ShardWriter:
    """Gathers accepted rows per split and writes them as shards of about ``shard_rows`` rows into ``work``."""

    def __init__(self, work: Path, splits: List[str], schema: DatasetSchema, shard_rows: int) -> None:
        self.work, self.shard_rows = work, shard_rows
        self.frequency_features = [f for f in schema.categorical if not schema.vocabulary_rule(f).is_hash]
        self.key_columns = schema.key_columns
        self.counter = _TokenCounter(self.frequency_features)
        self.pending: Dict[str, List[Tuple[np.ndarray, ...]]] = {split: [] for split in splits}
        self.shards: Dict[str, List[Dict]] = {split: [] for split in splits}
        self.rows = {split: 0 for split in splits}
        self.label_sums = {split: np.zeros(len(schema.labels)) for split in splits}
        self.label_counts = {split: np.zeros(len(schema.labels), dtype=np.int64) for split in splits}
        for split in splits:
            (work / split).mkdir()

    def add(self, split: str, parsed: ParsedChunk, rows: np.ndarray) -> None:
        arrays = (parsed.dense, parsed.sparse, parsed.labels, parsed.tokens, parsed.keys)
        self.pending[split].append(tuple(array[rows] for array in arrays))
        if sum(len(part[0]) for part in self.pending[split]) >= self.shard_rows:
            self.flush(split)

    def flush(self, split: str) -> None:
        if not self.pending[split]:
            return
        dense, sparse, labels, tokens, keys = (np.concatenate(arrays) for arrays in zip(*self.pending[split]))
        self.pending[split] = []
        name = f"part-{len(self.shards[split]):05d}"
        for part, array in (("dense", dense), ("sparse", sparse), ("labels", labels)):
            _save_npy(self.work / split / f"{name}.{part}.npy", array)
        if self.frequency_features:
            _save_npy(self.work / split / f"{name}.tokens.npy", tokens)
        if self.key_columns:
            _save_npy(self.work / split / f"{name}.keys.npy", keys)
        self.shards[split].append({"name": name, "rows": len(dense)})
        self.rows[split] += len(dense)
        present = ~np.isnan(labels)
        self.label_sums[split] += np.where(present, labels, 0.0).sum(axis=0)
        self.label_counts[split] += present.sum(axis=0)

    def finish(self, schema: DatasetSchema) -> Dict[str, int]:
        """Flush, build the ``min_count`` vocabularies from the training split, map every shard's tokens through
        them, and return each feature's table size."""
        for split in self.pending:
            self.flush(split)
        table_sizes = {f: schema.vocabulary_rule(f).hash_size for f in schema.categorical}
        vocabularies = []
        for feature in self.frequency_features:
            vocabulary = self.counter.vocabulary(feature, schema.vocabulary_rule(feature).min_count)
            _save_npy(self.work / "vocab" / f"{feature}.npy", vocabulary)
            table_sizes[feature] = len(vocabulary) + 1
            vocabularies.append((schema.categorical.index(feature), vocabulary))

        def map_tokens(shard_path: Path) -> None:
            sparse_path, tokens_path = (shard_path.with_suffix(f".{part}.npy") for part in ("sparse", "tokens"))
            sparse, tokens = np.load(sparse_path), np.load(tokens_path)
            for t, (column, vocabulary) in enumerate(vocabularies):
                sparse[:, column] = _tokens_to_rows(tokens[:, t], vocabulary)
            _save_npy(sparse_path, sparse)
            tokens_path.unlink()

        if vocabularies:
            paths = [self.work / split / s["name"] for split, shards in self.shards.items() for s in shards]
            with ThreadPoolExecutor(max_workers=_PARSE_THREADS) as pool:
                list(pool.map(map_tokens, paths))
        return table_sizes

    def label_means(self, split: str, labels: List[str]) -> Dict[str, Optional[float]]:
        sums, counts = self.label_sums[split], self.label_counts[split]
        return {name: (float(sums[i] / counts[i]) if counts[i] else None) for i, name in enumerate(labels)}


def _header_columns(header: str, schema: DatasetSchema, path: Path) -> List[str]:
    names = [name.strip().lstrip("\ufeff") for name in header.split(schema.separator)]
    allowed = set(schema.features_and_labels) | set(schema.ignore)
    for position, name in enumerate(names, start=1):
        if name not in allowed:
            raise LogFormatError(
                f"{path}:1: header column {position} is {name!r}, which schema {schema.source} neither uses nor "
                f"ignores (add it under ignore, or fix the file)"
            )
    missing = [c for c in schema.features_and_labels if c not in names]
    if missing:
        raise LogFormatError(f"{path}:1: header lacks column(s) {missing} that schema {schema.source} needs")
    return names


def preprocess(
    schema: DatasetSchema,
    files_by_split: Dict[str, Sequence[str | os.PathLike]],
    out_dir: str | os.PathLike,
    test_fraction: float = 0.0,
    split_seed: int = 0,
    max_bad_fraction: float = 0.01,
    chunk_bytes: int = 8 << 20,
    max_line_bytes: int = MAX_LINE_BYTES,
    shard_rows: int = 1 << 18,
    show_examples: int = 5,
    progress: bool = True,
    out_option: str = "--out",
) -> PreprocessSummary:
    """Read every file of every split, write shards into ``out_dir`` and return the summary.

    Args:
        files_by_split: split name -> files (plain or gzip, detected by content). With ``test_fraction`` > 0, a seeded
            share of the ``train`` files' rows goes to ``test`` instead (drawn per line, so chunking never changes it).
        max_bad_fraction: stop with TooManyBadRows once rejected / read exceeds it (checked after every chunk).
        chunk_bytes: bytes read and parsed at a time (memory scales with it; 8 MiB was fastest on 2 cores).
        max_line_bytes: a longer line (bytes before its line end) is rejected as "line too long" and skipped as it
            is read, so memory stays within a few times ``chunk_bytes + max_line_bytes`` whatever the lines.
        shard_rows: rows per shard file (the last shard of a split holds the rest).
        out_option: how the user named ``out_dir`` (an option or a config key), for the messages.

    The shards are written into a fresh folder beside ``out_dir`` and renamed into place at the end
    (torchrec_mtl.outputs.new_folder): ``out_dir`` is replaced only when it holds earlier shards, never when it holds
    anything else or any of the input files (OutputError before anything is read). When the run stops for too many
    bad rows, that folder is kept for its ``rejects.tsv``.
    """
    inputs = [path for paths in files_by_split.values() for path in paths]
    with new_folder(out_dir, "shards", inputs, option=out_option, keep_on=(TooManyBadRows,)) as work:
        return _write_shards(
            work, schema, files_by_split, Path(out_dir), test_fraction, split_seed, max_bad_fraction, chunk_bytes,
            max_line_bytes, shard_rows, show_examples, progress,
        )  # fmt: skip


def _write_shards(
    work: Path,
    schema: DatasetSchema,
    files_by_split: Dict[str, Sequence[str | os.PathLike]],
    out_dir: Path,
    test_fraction: float,
    split_seed: int,
    max_bad_fraction: float,
    chunk_bytes: int,
    max_line_bytes: int,
    shard_rows: int,
    show_examples: int,
    progress: bool,
) -> PreprocessSummary:
    started = time.perf_counter()
    (work / "vocab").mkdir()
    splits = list(dict.fromkeys([*files_by_split, *(["test"] if test_fraction > 0 else [])]))
    writer = _ShardWriter(work, splits, schema, shard_rows)
    summary = PreprocessSummary(rows_written=writer.rows, out_dir=str(out_dir))
    parsers: Dict[Tuple[str, ...], ChunkParser] = {}
    inputs = _describe_files(files_by_split)
    rejects = open(work / "rejects.tsv", "w", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed below)
    rejects.write("file\tline\treason\tcolumn\tvalue\traw_line\n")
    bar = tqdm(
        total=sum(i["bytes"] for i in inputs), unit="B", unit_scale=True, desc="preprocess", disable=not progress
    )

    def parse(parser: ChunkParser, chunk: bytes, first_line: int, too_long: List, file_index: int, split: str):
        """Runs on a worker thread: check and convert, route each kept row to a split, count training tokens."""
        parsed = parser.parse(chunk, first_line, too_long)
        destination = np.full(len(parsed.line_numbers), splits.index(split), dtype=np.int8)
        if test_fraction > 0 and split == "train":
            destination[_uniform(split_seed, file_index, parsed.line_numbers) < test_fraction] = splits.index("test")
        train = destination == splits.index("train") if "train" in splits else np.zeros(len(destination), bool)
        counts = writer.counter.count(parsed.tokens[train]) if writer.frequency_features else []
        return parsed, destination, counts

    def _write(described: Dict, parsed: ParsedChunk, destination: np.ndarray, counts: List[pl.DataFrame]) -> None:
        path = described["path"]
        described["rows_read"] = described.get("rows_read", 0) + parsed.lines
        described["rows_rejected"] = described.get("rows_rejected", 0) + len(parsed.rejections)
        summary.rows_read += parsed.lines
        summary.rows_accepted += len(parsed.line_numbers)
        summary.padded += parsed.padded
        for line, reason, column, value, raw in parsed.rejections:
            summary.rejected[reason] += 1
            if len(summary.examples) < show_examples:
                summary.examples.append(Rejection(path, line, reason, column, value))
            rejects.write(f"{path}\t{line}\t{reason}\t{column}\t{_one_line(value)}\t{_one_line(raw)}\n")
        if counts:
            writer.counter.add(counts)
        for target_index, target in enumerate(splits):
            rows = destination == target_index
            if rows.any():
                writer.add(target, parsed, rows)
        bar.set_postfix(rows=f"{summary.rows_read:,}", rejected=f"{summary.rows_rejected:,}", refresh=False)
        if summary.rows_read and summary.rows_rejected / summary.rows_read > max_bad_fraction:
            raise TooManyBadRows(
                f"{summary.rows_rejected:,} of {summary.rows_read:,} rows read so far were rejected "
                f"({summary.rows_rejected / summary.rows_read:.2%} > max_bad_fraction {max_bad_fraction:.2%}); "
                f"stopped in {path}.\n{summary.text()}\nall rejected rows: {work / 'rejects.tsv'}"
            )

    def chunks() -> Iterator[Tuple[int, Dict, ChunkParser, bytes, int, List[LineTooLong]]]:
        """(file index, input, parser, chunk, number of its first line, its lines too long), header rows consumed,
        in file order."""
        for file_index, described in enumerate(inputs):
            path = Path(described["path"])
            file_columns: Optional[List[str]] = None if schema.header else schema.columns
            next_line, consumed = 1, 0
            for chunk, position, too_long in read_chunks(path, chunk_bytes, max_line_bytes):
                bar.update(position - consumed)
                consumed = position
                if next_line == 1 and chunk.startswith(b"\xef\xbb\xbf"):
                    chunk = chunk[3:]  # a UTF-8 byte order mark
                if file_columns is None:
                    if too_long and too_long[0].index == 0:
                        raise LogFormatError(f"{path}:1: the header is too long ({too_long[0].value()})")
                    header, chunk, too_long = drop_first_line(chunk, too_long)
                    file_columns = _header_columns(header.decode("utf-8", "replace"), schema, path)
                    next_line = 2
                    if not chunk:
                        continue
                key = tuple(file_columns)
                if key not in parsers:
                    parsers[key] = ChunkParser(schema, file_columns)
                yield file_index, described, parsers[key], chunk, next_line, too_long
                next_line += chunk.count(b"\n")

    # polars and numpy release the GIL: parsing the next chunks overlaps writing this one (order is kept).
    with rejects, bar, ThreadPoolExecutor(max_workers=_PARSE_THREADS) as pool:
        in_flight: Deque = deque()
        for file_index, described, parser, chunk, first_line, too_long in chunks():
            job = pool.submit(parse, parser, chunk, first_line, too_long, file_index, described["split"])
            in_flight.append((described, job))
            if len(in_flight) > _PARSE_THREADS:
                described, job = in_flight.popleft()
                _write(described, *job.result())
        while in_flight:
            described, job = in_flight.popleft()
            _write(described, *job.result())
    table_sizes = writer.finish(schema)

    summary.seconds = time.perf_counter() - started
    assert (
        summary.rows_read
        == summary.total_written + summary.rows_rejected
        == summary.rows_accepted + summary.rows_rejected
    )
    metadata = {
        "format_version": FORMAT_VERSION,
        "fingerprint": input_fingerprint(schema, files_by_split, test_fraction=test_fraction, split_seed=split_seed),
        "schema": {"name": schema.name, "source": schema.source, "fingerprint": schema.fingerprint()},
        "dense_features": schema.dense,
        "categorical_features": schema.categorical,
        "labels": {name: spec.kind for name, spec in schema.labels.items()},
        "user_id": schema.user_id,
        "item_id": schema.item_id,
        "item_text_key": schema.item_text_key,
        "key_columns": schema.key_columns,
        "table_sizes": {f: table_sizes[f] for f in schema.categorical},
        "vocabulary_rules": {
            f: {k: v for k, v in vars(schema.vocabulary_rule(f)).items() if v is not None} for f in schema.categorical
        },
        "splits": {
            split: {
                "rows": writer.rows[split],
                "shards": writer.shards[split],
                "label_means": writer.label_means(split, list(schema.labels)),
            }
            for split in splits
        },
        "counts": {
            "rows_read": summary.rows_read,
            "rows_written": summary.total_written,
            "rows_rejected": summary.rows_rejected,
            "rejected_by_reason": dict(summary.rejected.most_common()),
            "padded_short_rows": summary.padded,
        },
        "inputs": inputs,
        "split_options": {"test_fraction": test_fraction, "split_seed": split_seed},
        "seconds": round(summary.seconds, 2),
    }
    (work / "metadata.json").write_text(json.dumps(metadata, indent=2, allow_nan=False))  # strict JSON
    if progress:
        print(summary.text(), file=sys.stderr, flush=True)
    return summary


def _one_line(text: str) -> str:
    """A field of rejects.tsv: backslash, tab, CR and LF escaped, so the file stays six tab-separated columns."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")
