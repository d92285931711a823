"""Score a log with a trained model: each line checked and encoded as in training, one prediction per task per row.

New traffic has no labels, so labels are read when a line has them (a value present is checked) and never
required. The layout is decided per file from its first line:

- a header row, when the schema declares ``header: true`` or every field of line 1 is a column name of the schema:
  columns matched by name as preprocessing matches them; the label columns may be absent, and columns the schema
  ignores may be there;
- otherwise by its field count: the training layout (the schema's columns, labels filled or empty) or the same
  without the label columns. A first line that is neither is a LogFormatError naming the file, the line, the field
  count and the counts expected. (Empty lines and lines too long before it are rejected and the next one decides;
  where the schema pads short rows, a short first line is decided by the first chunk's full-length lines.)

The features are encoded exactly as in training: the same dense transform and hashing, the vocabularies
preprocessing saved beside the shards, and the item text, when the model has it, through the run's items file. List
columns are split, checked and cut by preprocessing's own parser and mapped through the vocabulary each uses (its
own, or the column's it shares); the model takes them as a KeyedJaggedTensor's values and lengths
(torchrec_mtl.inference.ListInferenceModel, ``EncodedRows.model_inputs``).
A sequence model's histories (model.sequence) are list columns read the same way; its sequence features are
aligned position by position, so a row whose kept lengths of them differ is rejected (``SEQUENCE_LENGTHS_DIFFER``).
Every line is scored or rejected with the preprocessing reasons (torchrec_mtl.data.preprocess) or that one, lines
longer than ``max_line_bytes`` included ("line too long", skipped without being held whole); a header row is
neither. The output is a TSV with the input's line number and one column per task (probabilities; values for
regression tasks).

Example::

    >>> trained = load_trained("runs/main/checkpoints")  # doctest: +SKIP
    >>> predict_file(trained, "runs/data/synthetic/test.tsv", "runs/main/predictions.tsv")  # doctest: +SKIP
    {'lines': 600000, 'scored': 600000, 'rejected': 0}
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass, replace
from functools import reduce
from itertools import chain
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from torchrec_mtl.data.preprocess import (
    MAX_LINE_BYTES,
    ChunkParser,
    LineTooLong,
    ListValues,
    LogFormatError,
    drop_first_line,
    header_columns,
    read_chunks,
    tokens_to_rows,
)
from torchrec_mtl.data.prepare import shards_dir
from torchrec_mtl.data.shards import ShardError
from torchrec_mtl.ensemble import mean_predictions
from torchrec_mtl.inference import TrainedModel, sequence_features
from torchrec_mtl.outputs import new_file
from torchrec_mtl.schema import DatasetSchema, LabelSpec
from torchrec_mtl.progress import bar_disabled

CHUNK_BYTES = 8 << 20
HEADER_START = "line\t"  # the scores file's first column: a file that starts so is one of ours
# The one reason predict rejects a row for beyond preprocessing's (torchrec_mtl.data.preprocess.REASONS): a sequence
# model's histories (model.sequence: lists aligned position by position) keep different lengths.
SEQUENCE_LENGTHS_DIFFER = "sequence lengths differ"


class _Encoder:
    """The training run's encoding of a line's features: dense transform, hashed rows, vocabulary rows, text rows,
    whatever the layout of the file (``layout``)."""

    def __init__(self, trained: TrainedModel) -> None:
        config = trained.config
        schema = DatasetSchema.from_yaml(config.data.schema)
        # a label is read when the line has it (a value present is checked) and never required
        optional = {name: LabelSpec(spec.kind, optional=True) for name, spec in schema.labels.items()}
        self.schema = replace(schema, labels=optional)
        self.columns = self.schema.columns  # the training layout
        self.unlabeled = [c for c in self.columns if c not in self.schema.labels]
        self.known = set(self.schema.features_and_labels) | set(self.schema.ignore)
        self.parsers: Dict[Tuple[str, ...], ChunkParser] = {}
        vocab = shards_dir(config.data) / "vocab"
        needs_vocabularies = any(not self.schema.vocabulary_rule(f).is_hash for f in self.schema.categorical)
        if needs_vocabularies and not vocab.is_dir():
            raise ShardError(
                f"{vocab}: the vocabularies of the training run ({trained.checkpoint}) are gone; predict encodes "
                "IDs with them, so it needs the run's data folder (data.dir / data.shards) where training left it"
            )
        # every min_count feature's vocabulary, a list's being the one of the column it shares (preprocessing saved
        # one file per owner: vocab/<owner>.npy), each file read once
        owners = {f: self.schema.vocabulary_owner(f) for f in self.schema.categorical
                  if not self.schema.vocabulary_rule(f).is_hash}  # fmt: skip
        loaded = {owner: np.load(vocab / f"{owner}.npy") for owner in dict.fromkeys(owners.values())}
        self.vocabulary_of: Dict[str, np.ndarray] = {f: loaded[owner] for f, owner in owners.items()}
        # the single-ID ones by their column among the sparse (single-ID) columns, in the parser's tokens order
        single = self.schema.single_id_columns
        self.vocabularies = [(single.index(f), self.vocabulary_of[f]) for f in single if f in self.vocabulary_of]
        self.list_features = self.schema.list_columns
        # the lists the model attends over (model.sequence): aligned position by position
        self.aligned = [self.list_features.index(f) for f in sequence_features(trained.inputs)]
        self.text_rows, self.text_table = None, None
        if trained.inputs["item_text"] is not None:
            from torchrec_mtl.text.table import ItemTextTable

            text = config.model.text
            table = ItemTextTable.load(
                Path(config.data.dir) / text.items, Path(config.data.dir) / text.cache, self.schema.categorical_format
            )
            key = self.schema.key_columns.index(self.schema.item_text_key)
            self.text_rows, self.text_table = (lambda keys: table.rows(keys[:, key])), table

    def layout(
        self, name: str, chunk: bytes, first_line: int, too_long: Sequence[LineTooLong]
    ) -> Tuple[Optional[List[str]], bytes, int, Sequence[LineTooLong]]:
        """The columns of the file ``name`` whose first chunk this is, and the chunk, its first line's number and its
        lines too long once a header row is taken off. The columns are None (undecided) while the lines so far are
        empty or too long: they are rejected whatever the layout."""
        schema = self.schema
        skipped = {t.index for t in too_long}
        if first_line == 1 and 0 in skipped and schema.header:
            raise LogFormatError(f"{name}:1: the header is too long ({too_long[0].value()})")
        if first_line == 1 and 0 not in skipped:
            line = chunk[: chunk.find(b"\n")].rstrip(b"\r").decode("utf-8", "replace")
            names = [column.strip().lstrip("\ufeff") for column in line.split(schema.separator)]
            if schema.header or set(names) <= self.known:
                _, chunk, too_long = drop_first_line(chunk, too_long)
                features = [*schema.integer, *schema.numeric, *schema.categorical]  # labels may be absent
                return header_columns(line, schema, name, required=features), chunk, 2, too_long
        # the lines read whole and not empty (the others are rejected whatever the layout)
        lines = [(i, line) for i, line in enumerate(chunk.rstrip(b"\n").split(b"\n")) if i not in skipped]
        lines = [(i, line.rstrip(b"\r")) for i, line in lines if line.rstrip(b"\r")]
        if not lines:
            return None, chunk, first_line, too_long
        separator = schema.separator.encode()
        full, bare = len(self.columns), len(self.unlabeled)
        # the layout most of the first chunk's lines have: one malformed line (the first one, say) is rejected as
        # any other, it does not decide for the file
        found = Counter(line.count(separator) + 1 for _, line in lines)
        if schema.pad_short_rows:  # padded rows of either layout are short: full-length rows decide
            return (self.columns if found[full] or not found[bare] else self.unlabeled), chunk, first_line, too_long
        if found[full] or found[bare]:
            return (self.columns if found[full] >= found[bare] else self.unlabeled), chunk, first_line, too_long
        i, line = lines[0]
        fields = line.count(separator) + 1
        names = [column.strip() for column in line.decode("utf-8", "replace").split(schema.separator)]
        unknown = [column for column in names if column not in self.known]
        hint = (
            f"; read as a header, {unknown[:5]} are not columns of it (list them under ignore)"
            if first_line + i == 1 and len(unknown) < fields
            else ""
        )
        line_number = first_line + i
        raise LogFormatError(
            f"{name}:{line_number}: {fields} fields; predict reads {full} (the training layout of schema "
            f"{schema.source}), {bare} (the same without the label columns {list(schema.labels)}) or a header row "
            f"of its column names{hint}"
        )

    def parser(self, columns: Sequence[str]) -> ChunkParser:
        key = tuple(columns)
        if key not in self.parsers:
            self.parsers[key] = ChunkParser(self.schema, columns)
        return self.parsers[key]

    def encode(
        self,
        chunk: bytes,
        first_line: int,
        columns: Optional[Sequence[str]] = None,
        too_long: Sequence[LineTooLong] = (),
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(line numbers, dense, sparse ids, rejections) of a chunk of whole lines laid out as ``columns`` (default:
        the training layout), for a schema without list columns (``encode_rows`` carries the lists too)."""
        if self.list_features:
            raise ValueError(f"schema {self.schema.source} has list columns {self.list_features}: use encode_rows")
        rows = self.encode_rows(chunk, first_line, columns, too_long)
        return rows.line_numbers, rows.dense, rows.sparse, rows.rejections

    def encode_rows(
        self,
        chunk: bytes,
        first_line: int,
        columns: Optional[Sequence[str]] = None,
        too_long: Sequence[LineTooLong] = (),
    ) -> "EncodedRows":
        """The accepted rows of a chunk of whole lines laid out as ``columns`` (default: the training layout), as
        the model takes them, and the rejections of the others (preprocessing's parser: the same checks and
        reasons, lists split, checked and truncated by their keep rule)."""
        parsed = self.parser(columns or self.columns).parse(chunk, first_line, too_long)
        sparse = parsed.sparse.astype(np.int64)
        for t, (column, vocabulary) in enumerate(self.vocabularies):
            sparse[:, column] = tokens_to_rows(parsed.tokens[:, t], vocabulary)
        if self.text_rows is not None:
            sparse = np.concatenate([sparse, self.text_rows(parsed.keys)[:, None]], axis=1)
        lists = []
        for feature in self.list_features:
            values = parsed.lists[feature]  # table rows when hashed, else raw tokens for the shared vocabulary
            if feature in self.vocabulary_of:
                values = ListValues(tokens_to_rows(values.values, self.vocabulary_of[feature]), values.lengths)
            lists.append(ListValues(values.values.astype(np.int64, copy=False), values.lengths))
        rows = EncodedRows(parsed.line_numbers, parsed.dense, sparse, lists, parsed.rejections)
        return self._aligned_only(rows, chunk, first_line)

    def _aligned_only(self, rows: "EncodedRows", chunk: bytes, first_line: int) -> "EncodedRows":
        """``rows`` less those whose sequence features (aligned position by position) keep different lengths,
        rejected as ``SEQUENCE_LENGTHS_DIFFER`` naming the first feature that differs from the first one (the model
        refuses such a row, and would refuse the whole batch with it: training never saw one)."""
        if len(self.aligned) < 2:
            return rows
        lengths = np.stack([rows.lists[i].lengths for i in self.aligned])
        differ = (lengths != lengths[0]).any(axis=0)
        if not differ.any():
            return rows
        lines = chunk.split(b"\n")
        rejections = list(rows.rejections)
        for row in np.flatnonzero(differ):
            other = int(np.flatnonzero(lengths[:, row] != lengths[0, row])[0])
            first, feature = self.list_features[self.aligned[0]], self.list_features[self.aligned[other]]
            value = f"keeps {int(lengths[other, row])}, {first} {int(lengths[0, row])}"
            line = int(rows.line_numbers[row])
            raw = lines[line - first_line].rstrip(b"\r").decode("utf-8", "replace")
            rejections.append((line, SEQUENCE_LENGTHS_DIFFER, feature, value, raw))
        return replace(rows.take(~differ), rejections=sorted(rejections, key=lambda rejection: rejection[0]))


@dataclass
class EncodedRows:
    """Encoded rows of a chunk: ``dense`` [n, D] float32, ``sparse`` [n, S] int64 table rows of the single-ID
    features (and the item-text row last, with text), ``lists`` one ListValues of table rows per list feature (in
    the schema's order), and the rejections of the chunk's other lines."""

    line_numbers: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    lists: List[ListValues]
    rejections: list

    def __len__(self) -> int:
        return len(self.line_numbers)

    def take(self, rows: np.ndarray) -> "EncodedRows":
        """The rows a boolean mask ``rows`` selects (the rejections as they are)."""
        lists = [values.take(rows) for values in self.lists]
        return EncodedRows(self.line_numbers[rows], self.dense[rows], self.sparse[rows], lists, self.rejections)

    def model_inputs(self, start: int, end: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """Rows ``start:end`` as the model's arguments on ``device``: (dense, sparse_ids), and with list features
        (list_values, list_lengths [lists, rows]) after them (torchrec_mtl.inference.ListInferenceModel)."""
        arrays = [self.dense[start:end], self.sparse[start:end]]
        if self.lists:
            values = [lists.values[lists.offsets[start] : lists.offsets[end]] for lists in self.lists]
            arrays += [np.concatenate(values), np.stack([lists.lengths[start:end] for lists in self.lists])]
        return tuple(torch.from_numpy(array).to(device) for array in arrays)


def predict_lines(
    trained: TrainedModel | Sequence[TrainedModel],
    path: str | Path,
    batch_size: int = 8192,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray], list]]:
    """For each chunk of ``path`` ("-": stdin): its scored lines' numbers, each task's predictions, its rejections.

    The layout is the file's (see the module's docstring); a line of more than ``max_line_bytes`` bytes is
    rejected as "line too long" without being held whole. Several models (an ensemble of one schema, tasks and data:
    torchrec_mtl.ensemble.check_members) read the file once, each encodes the lines as its own training run did, and
    each task's predictions are their mean (float64)."""
    members = [trained] if isinstance(trained, TrainedModel) else list(trained)
    encoders = [_Encoder(member) for member in members]
    where, source = ("stdin", Path("/dev/stdin")) if str(path) == "-" else (str(path), Path(path))
    columns: Optional[List[str]] = None
    with torch.no_grad():
        for chunk, first_line, too_long in _chunks(source, max_line_bytes):
            if columns is None:  # one schema: the first member's encoder decides for all
                columns, chunk, first_line, too_long = encoders[0].layout(where, chunk, first_line, too_long)
                if not chunk:
                    continue
            encoded = _common_rows([encoder.encode_rows(chunk, first_line, columns, too_long) for encoder in encoders])
            lines, rejections = encoded[0].line_numbers, encoded[0].rejections
            scores = [_score(member, rows, batch_size) for member, rows in zip(members, encoded)]
            if len(members) == 1:
                yield lines, scores[0], rejections
            else:
                yield lines, mean_predictions(scores), rejections


def _common_rows(encoded: List[EncodedRows]) -> List[EncodedRows]:
    """Each member's encoding of a chunk cut to the rows every member accepts, with every line any member rejects as
    the rejections (each once, the first member's reason first). The members of an ensemble read one schema, but a
    sequence model rejects the rows whose aligned histories keep different lengths, which another model reads."""
    if all(np.array_equal(rows.line_numbers, encoded[0].line_numbers) for rows in encoded[1:]):
        return encoded
    common = reduce(np.intersect1d, [rows.line_numbers for rows in encoded])
    rejections: Dict[int, tuple] = {}
    for rows in encoded:
        for rejection in rows.rejections:
            rejections.setdefault(rejection[0], rejection)
    merged = [rejections[line] for line in sorted(rejections)]
    return [replace(rows.take(np.isin(rows.line_numbers, common)), rejections=merged) for rows in encoded]


def _score(trained: TrainedModel, rows: EncodedRows, batch_size: int) -> Dict[str, np.ndarray]:
    """Each task's predictions of encoded rows, on the host."""
    outputs: Dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        part = trained.inference(*rows.model_inputs(start, min(start + batch_size, len(rows)), trained.device))
        for name, values in part.items():  # to the host, where the scores are written
            outputs.setdefault(name, []).append(values.cpu().numpy())
    return {name: np.concatenate(values) for name, values in outputs.items()}


def _chunks(path: Path, max_line_bytes: int) -> Iterator[Tuple[bytes, int, List[LineTooLong]]]:
    """Chunks of whole lines with the number of their first line and their lines too long (a leading UTF-8 byte
    order mark dropped)."""
    next_line = 1
    for chunk, _, too_long in read_chunks(path, CHUNK_BYTES, max_line_bytes):
        if next_line == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
        yield chunk, next_line, too_long
        next_line += chunk.count(b"\n")


def predict_file(
    trained: TrainedModel | Sequence[TrainedModel],
    path: str | Path,
    out: Optional[str | Path] = None,
    progress: bool = True,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Dict[str, object]:
    """Score every line of ``path`` into ``out`` (TSV; None or "-": stdout); returns the counts and the rejection
    reasons (lines read = scored + rejected; a header row is neither). A log whose layout is not the schema's stops
    with a LogFormatError before ``out`` is written. Several models: their ensemble, each task's column the mean of
    theirs (``predict_lines``), in the same layout."""
    members = [trained] if isinstance(trained, TrainedModel) else list(trained)
    scored = predict_lines(members, path, max_line_bytes=max_line_bytes)
    counts = {"lines": 0, "scored": 0, "rejected": 0}
    reasons: Counter = Counter()
    names = list(members[0].task_kinds)
    # a new file beside ``out``, renamed at the end: an earlier scores file of ours is replaced, nothing else is
    output = (
        contextlib.nullcontext(sys.stdout)
        if out in (None, "-")
        else new_file(out, inputs=[path, *(m.checkpoint for m in members)], ours_if_starts_with=HEADER_START)
    )
    with output as handle:
        first = next(scored, None)  # the first chunk decides the layout: an unreadable log stops here
        handle.write("\t".join([HEADER_START.rstrip("\t"), *names]) + "\n")
        with tqdm(desc=f"scoring {path}", unit="row", disable=bar_disabled(progress), file=sys.stderr) as bar:
            for lines, outputs, rejections in chain([first] if first is not None else [], scored):
                for i, line in enumerate(lines):
                    handle.write("\t".join([str(int(line)), *(f"{outputs[n][i]:.6g}" for n in names)]) + "\n")
                for _, reason, column, value, _ in rejections:
                    reasons[reason] += 1
                counts["scored"] += len(lines)
                counts["rejected"] += len(rejections)
                bar.update(len(lines) + len(rejections))
    counts["lines"] = counts["scored"] + counts["rejected"]
    return {**counts, "reasons": dict(reasons)}
