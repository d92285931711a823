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
``list element empty``    a list column (the schema's ``lists``) with an empty element: ``a||b``, a leading or
                          trailing separator (an empty field is an empty list, and kept)
``list element not hex``  an element of a ``hex`` list that is not a token as a ``hex`` categorical must be (a wrong
                          separator, ``a,b`` where ``|`` separates, makes one such element)
``list element not id``   the same for a ``decimal`` list
========================  ==========================================================================================

Columns are checked in file order: a row is rejected for its first bad column (the row-level reasons above come
first). A list longer than its ``max_length`` is no rejection: it is cut to its first or last ``max_length``
elements (its ``keep``) and counted per column (``truncated``, beside ``padded``).

Rejected rows go to ``rejects.tsv`` (file, line, reason, column, value, the raw line; in the last two backslash,
tab, CR and LF are written as ``\\\\``, ``\\t``, ``\\r``, ``\\n``), the first few are printed with
file:line, and ``max_bad_fraction`` stops the run once the rejected share of the rows read so far exceeds it.
Decoding is lenient: bytes that are not UTF-8 (and NUL bytes) become U+FFFD, which no numeric or hex check accepts.

Output (``out_dir``), written into a fresh hidden folder beside it and renamed at the end (torchrec_mtl.outputs), so a
half-written folder is never read and only earlier shards are ever replaced:

- ``<split>/part-NNNNN.{dense,sparse,labels}.npy``: float32 [n, dense], int32 [n, categorical] embedding rows,
  float32 [n, labels] with NaN for a missing optional label; ``np.load(..., mmap_mode="r")`` maps them.
- ``<split>/part-NNNNN.{lists,list_lengths}.npy``, with list columns: int32 [n, sum of their max_length] table
  rows (each list's ``max_length`` columns side by side, in ``categorical`` order, 0 after the row's length) and
  int32 [n, lists] lengths; ``sparse`` then holds the single-ID columns only.
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

import dataclasses
import json
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import polars as pl
from tqdm import tqdm

from torchrec_mtl.data.preprocess.errors import LogFormatError, TooManyBadRows
from torchrec_mtl.data.preprocess.parse import (
    FLOAT32_MAX,
    MISSING_TOKEN,
    REASONS,
    ChunkParser,
    ListValues,
    ParsedChunk,
    SplitChunk,
    split_chunk,
)
from torchrec_mtl.data.preprocess.read import MAX_LINE_BYTES, LineTooLong, drop_first_line, read_chunks
from torchrec_mtl.data.preprocess.vocab import TokenCounter, tokens_to_rows
from torchrec_mtl.data.preprocess.write import (
    FORMAT_VERSION,
    PARSE_THREADS,
    ShardWriter,
    describe_files,
    input_fingerprint,
    split_draw,
)
from torchrec_mtl.outputs import new_folder
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.progress import bar_disabled

__all__ = [
    "ChunkParser",
    "FLOAT32_MAX",
    "FORMAT_VERSION",
    "LineTooLong",
    "ListValues",
    "LogFormatError",
    "MAX_LINE_BYTES",
    "MISSING_TOKEN",
    "PARSE_THREADS",
    "ParsedChunk",
    "PreprocessSummary",
    "REASONS",
    "Rejection",
    "ShardWriter",
    "SplitChunk",
    "TokenCounter",
    "TooManyBadRows",
    "describe_files",
    "drop_first_line",
    "header_columns",
    "input_fingerprint",
    "preprocess",
    "read_chunks",
    "split_chunk",
    "split_draw",
    "tokens_to_rows",
]


@dataclass
class Rejection:
    """One rejected line, as printed among the summary's examples (``file:line: reason (column: value)``)."""

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
    """What a run read, wrote and rejected (``rows_read = rows written + rows rejected``), as preprocess returns it."""

    rows_read: int = 0
    rows_accepted: int = 0  # checked and kept; all of them are in rows_written once the run ends
    rows_written: Dict[str, int] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    padded: int = 0
    truncated: Counter = field(default_factory=Counter)  # list column -> rows whose list was cut to max_length
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
            + (f"; padded short rows {self.padded:,}" if self.padded else "")
            + (f"; truncated lists: {', '.join(f'{c} {n:,}' for c, n in self.truncated.items() if n)}"
               if sum(self.truncated.values()) else ""),
        ]
        for reason, count in self.rejected.most_common():
            lines.append(f"  rejected: {reason}: {count:,}")
        for example in self.examples:
            lines.append(f"    e.g. {example}")
        if self.seconds:
            lines.append(f"  {self.rows_read / self.seconds:,.0f} rows/s over {self.seconds:.1f} s -> {self.out_dir}")
        return "\n".join(lines)


def header_columns(
    header: str, schema: DatasetSchema, path: str | os.PathLike, required: Optional[Sequence[str]] = None
) -> List[str]:
    """The columns a header line names, in its order; LogFormatError for a name the schema neither uses nor ignores,
    a name given twice, or a ``required`` column (default: every label and feature) that is missing."""
    names = [name.strip().lstrip("\ufeff") for name in header.split(schema.separator)]
    allowed = set(schema.features_and_labels) | set(schema.ignore)
    for position, name in enumerate(names, start=1):
        if name not in allowed:
            raise LogFormatError(
                f"{path}:1: header column {position} is {name!r}, which schema {schema.source} neither uses nor "
                f"ignores (add it under ignore, or fix the file)"
            )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise LogFormatError(f"{path}:1: header names column(s) {twice} twice")
    missing = [c for c in (schema.features_and_labels if required is None else required) if c not in names]
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
    writer = ShardWriter(work, splits, schema, shard_rows)
    summary = PreprocessSummary(rows_written=writer.rows, out_dir=str(out_dir))
    parsers: Dict[Tuple[str, ...], ChunkParser] = {}
    inputs = describe_files(files_by_split)
    rejects = open(work / "rejects.tsv", "w", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed below)
    rejects.write("file\tline\treason\tcolumn\tvalue\traw_line\n")
    bar = tqdm(
        total=sum(i["bytes"] for i in inputs), unit="B", unit_scale=True, desc="preprocess", disable=bar_disabled(progress)
    )

    def parse(parser: ChunkParser, chunk: bytes, first_line: int, too_long: List, file_index: int, split: str):
        """Runs on a worker thread: check and convert, route each kept row to a split, count training tokens."""
        parsed = parser.parse(chunk, first_line, too_long)
        destination = np.full(len(parsed.line_numbers), splits.index(split), dtype=np.int8)
        if test_fraction > 0 and split == "train":
            destination[split_draw(split_seed, file_index, parsed.line_numbers) < test_fraction] = splits.index("test")
        train = destination == splits.index("train") if "train" in splits else np.zeros(len(destination), bool)
        counts = writer.counter.count(writer.training_tokens(parsed, train)) if writer.vocabularies else []
        return parsed, destination, counts

    def _write(described: Dict, parsed: ParsedChunk, destination: np.ndarray, counts: List[pl.DataFrame]) -> None:
        path = described["path"]
        described["rows_read"] = described.get("rows_read", 0) + parsed.lines
        described["rows_rejected"] = described.get("rows_rejected", 0) + len(parsed.rejections)
        summary.rows_read += parsed.lines
        summary.rows_accepted += len(parsed.line_numbers)
        summary.padded += parsed.padded
        summary.truncated.update(parsed.truncated)
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
                    file_columns = header_columns(header.decode("utf-8", "replace"), schema, path)
                    next_line = 2
                    if not chunk:
                        continue
                key = tuple(file_columns)
                if key not in parsers:
                    parsers[key] = ChunkParser(schema, file_columns)
                yield file_index, described, parsers[key], chunk, next_line, too_long
                next_line += chunk.count(b"\n")

    # polars and numpy release the GIL: parsing the next chunks overlaps writing this one (order is kept).
    with rejects, bar, ThreadPoolExecutor(max_workers=PARSE_THREADS) as pool:
        in_flight: Deque = deque()
        for file_index, described, parser, chunk, first_line, too_long in chunks():
            job = pool.submit(parse, parser, chunk, first_line, too_long, file_index, described["split"])
            in_flight.append((described, job))
            if len(in_flight) > PARSE_THREADS:
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
        "fingerprint": input_fingerprint(
            schema, files_by_split, test_fraction=test_fraction, split_seed=split_seed,
            # the limit decides which lines are rejected; the default stays out, so earlier shards are still reused
            **({"max_line_bytes": max_line_bytes} if max_line_bytes != MAX_LINE_BYTES else {}),
        ),  # fmt: skip
        "schema": {"name": schema.name, "source": schema.source, "fingerprint": schema.fingerprint()},
        "dense_features": schema.dense,
        "categorical_features": schema.categorical,
        "lists": {f: dataclasses.asdict(schema.lists[f]) for f in schema.list_columns},
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
            "truncated_lists": {f: summary.truncated[f] for f in schema.list_columns},
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
