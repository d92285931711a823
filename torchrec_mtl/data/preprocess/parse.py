"""Checking and converting one chunk of whole lines: split into fields, apply the schema's rule per column, and
either keep each row (as dense, sparse, token, key and label arrays) or reject it with the first reason that fails.

The reasons, in the order they are tried, are :data:`REASONS` (the table in torchrec_mtl.data.preprocess).
The field rules are mirrored in TorchScript for the exported serve.pt (torchrec_mtl.data.preprocess.fields): a change
here is a change there (tests/test_serving.py holds the two to the same readings).

Example::

    >>> parser = ChunkParser(schema, schema.columns)  # doctest: +SKIP
    >>> parsed = parser.parse(b"1\\t3\\t...\\n", first_line=1)  # doctest: +SKIP
    >>> parsed.lines == len(parsed.line_numbers) + len(parsed.rejections)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import polars as pl

from torchrec_mtl.data.preprocess.read import LineTooLong
from torchrec_mtl.schema import DatasetSchema

# Every reason a row can be rejected for, in the order tried (the table in torchrec_mtl.data.preprocess).
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
    "list element empty",
    "list element not hex",
    "list element not id",
)
MISSING_TOKEN = -1  # an empty categorical field: no valid token is negative
FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    if name in schema.lists:
        return _list_rules(schema, name, text, value)
    if name in schema.categorical:
        base, reason = (16, "categorical not hex") if schema.categorical_format == "hex" else (10, "categorical not id")
        # to_integer accepts a sign; tokens have none (a negative value is caught by value < 0)
        bad = ~empty & (value.is_null() | (value < 0).fill_null(False) | text.str.starts_with("+"))
        return text.str.to_integer(base=base, strict=False), bad, pl.lit(reason)
    return None, None, None


def _list_rules(schema: DatasetSchema, name: str, text: pl.Expr, value: pl.Expr) -> Tuple[pl.Expr, pl.Expr, pl.Expr]:
    """A list column's (parse, is-bad, reason): the field split at the list's separator, each element a token as a
    single categorical's (``value``: the list of tokens, null elements where one is not). An empty field is an
    empty list; an empty element (``a||b``, a leading or trailing separator) is ``list element empty``. Not mirrored
    in fields.py: serve.pt does not take list features yet (an export of a model with lists is refused)."""
    separator = schema.lists[name].separator
    base, reason = (16, "list element not hex") if schema.categorical_format == "hex" else (10, "list element not id")
    empty = text.is_null() | (text == "")
    parse = text.str.split(separator).list.eval(pl.element().str.to_integer(base=base, strict=False))
    empty_element = ~empty & (
        text.str.starts_with(separator)
        | text.str.ends_with(separator)
        | text.str.contains(separator + separator, literal=True)
    )
    # to_integer accepts a sign; tokens have none (a negative element is caught by its minimum)
    signed = text.str.starts_with("+") | text.str.contains(separator + "+", literal=True)
    not_token = (value.list.drop_nulls().list.len() < value.list.len()) | (value.list.min() < 0) | signed
    bad = empty_element | (~empty & not_token.fill_null(False))
    return parse, bad, pl.when(empty_element).then(pl.lit("list element empty")).otherwise(pl.lit(reason))


@dataclass
class ListValues:
    """A list column's accepted rows, flat: the ``lengths`` [n] int32 of each row's list (after truncation) and its
    ``values`` [sum(lengths)] int64, row after row: table rows for a hashed column, raw tokens for one still to be
    mapped through a vocabulary.

    Example::

        >>> lists = ListValues(np.array([7, 8, 9]), np.array([2, 0, 1], dtype=np.int32))
        >>> lists.take(np.array([False, True, True])).values.tolist()
        [9]
        >>> padded = np.zeros((3, 2), dtype=np.int32); lists.fill(padded); padded.tolist()
        [[7, 8], [0, 0], [9, 0]]
    """

    values: np.ndarray
    lengths: np.ndarray

    @cached_property
    def offsets(self) -> np.ndarray:
        """Where each row's values start in ``values``, and last where they end: int64 [n + 1] (computed once, for
        cutting the rows into batches)."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def take(self, rows: np.ndarray) -> "ListValues":
        """The rows a boolean mask ``rows`` selects."""
        if rows.all():  # the usual case (a chunk of one split): no copy
            return self
        return ListValues(self.values[np.repeat(rows, self.lengths)], self.lengths[rows])

    def fill(self, out: np.ndarray) -> None:
        """Write row i's values into the first ``lengths[i]`` places of ``out``'s row i ([n, width], in place: a
        view into a larger array or a memory map works); the places after them are left as they are."""
        out[np.arange(out.shape[1]) < self.lengths[:, None]] = self.values  # row-major: each row's values in order


@dataclass
class ParsedChunk:
    """A chunk checked and converted: the arrays of its accepted rows and the rejections of the others."""

    line_numbers: np.ndarray  # of the accepted rows
    dense: np.ndarray
    sparse: np.ndarray  # int32 [n, single-ID columns] rows for hash features, 0 where a vocabulary is still to come
    tokens: np.ndarray  # int64 [n, len(frequency features)] raw tokens, MISSING_TOKEN for empty
    keys: np.ndarray  # int64 [n, len(key columns)] raw tokens, MISSING_TOKEN for empty
    labels: np.ndarray
    rejections: List[Tuple[int, str, str, str, str]]  # (line, reason, column, value, raw line)
    padded: int
    lines: int
    lists: Dict[str, ListValues] = field(default_factory=dict)  # per list column, its accepted rows
    truncated: Dict[str, int] = field(default_factory=dict)  # per list column, accepted rows cut to max_length


class ChunkParser:
    """Checks and converts lines whose fields are laid out as ``file_columns``: each field is parsed once.

    Every feature must be among ``file_columns``; a label may be absent (predict scores logs without labels): it is
    then missing (NaN) on every row."""

    def __init__(self, schema: DatasetSchema, file_columns: Sequence[str]) -> None:
        self.schema, self.file_columns = schema, list(file_columns)
        self.frequency_features = [f for f in schema.single_id_columns if not schema.vocabulary_rule(f).is_hash]
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
        single = schema.single_id_columns
        self.hash_columns = [i for i, f in enumerate(single) if schema.vocabulary_rule(f).is_hash]
        self.sparse_exprs = [
            (1 + value(f) % (schema.vocabulary_rule(f).hash_size - 1)).fill_null(0).cast(pl.Int32).alias(f"s{i}")
            for i, f in ((i, single[i]) for i in self.hash_columns)
        ]
        # each list's tokens as kept (its first or last max_length), and whether the row had more
        lists = {f: schema.lists[f] for f in schema.list_columns}
        self.list_exprs = {
            f: (value(f).list.head(spec.max_length) if spec.keep == "first" else value(f).list.tail(spec.max_length))
            for f, spec in lists.items()
        }
        self.truncated_exprs = [(value(f).list.len() > spec.max_length).sum().alias(f) for f, spec in lists.items()]
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
        # the kept rows' parsed values only (all that is read below): their text fields are not copied again
        kept = frame.select(pl.exclude("^field_.*$")).filter(~pl.col("rejected"))
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
            lists={f: self._list_values(kept, f) for f in self.list_exprs},
            truncated=kept.select(self.truncated_exprs).row(0, named=True) if self.truncated_exprs else {},
        )

    def _list_values(self, kept: pl.DataFrame, feature: str) -> ListValues:
        """A list column's kept tokens, flat, as table rows when it is hashed (else raw tokens, for its vocabulary)."""
        kept_tokens = kept.select(self.list_exprs[feature].alias("tokens"))
        lengths = kept_tokens.select(pl.col("tokens").list.len().fill_null(0)).to_series().to_numpy()
        # an empty (or null) list explodes to one null; the kept rows' elements are all tokens
        values = kept_tokens.select(pl.col("tokens").explode().drop_nulls()).to_series().to_numpy()
        values = values.astype(np.int64, copy=False)
        rule = self.schema.vocabulary_rule(feature)
        if rule.is_hash:
            values = 1 + values % (rule.hash_size - 1)
        return ListValues(values, lengths.astype(np.int32))

    def _sparse(self, kept: pl.DataFrame) -> np.ndarray:
        """Rows of the hashed single-ID features; the vocabulary features' columns stay 0 until their vocabulary
        exists."""
        if len(self.hash_columns) == len(self.schema.single_id_columns):
            return _matrix(kept, self.sparse_exprs, np.int32, kept.height)
        sparse = np.zeros((kept.height, len(self.schema.single_id_columns)), dtype=np.int32)
        if self.hash_columns:
            sparse[:, self.hash_columns] = _matrix(kept, self.sparse_exprs, np.int32, kept.height)
        return sparse


def _matrix(frame: pl.DataFrame, exprs: List[pl.Expr], dtype: type, rows: int) -> np.ndarray:
    if not exprs:
        return np.zeros((rows, 0), dtype=dtype)
    return np.ascontiguousarray(frame.select(exprs).to_numpy().astype(dtype, copy=False))
