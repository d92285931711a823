"""Writing shards: the split each line is drawn into, the shard files per split, the vocabularies built at the
end, and the fingerprint of the inputs that a set of shards was made from.

Example::

    >>> split_draw(0, 0, np.arange(1, 4)) < 0.2  # which of lines 1-3 of the first file go to test
    array([False, False,  True])
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_mtl.data.preprocess.parse import ListValues, ParsedChunk
from torchrec_mtl.data.preprocess.vocab import TokenCounter, tokens_to_rows
from torchrec_mtl.schema import DatasetSchema

# of the shards and metadata.json (torchrec_mtl.data.shards refuses other versions); 3: list columns, ``sparse``
# holds the single-ID columns only
FORMAT_VERSION = 3
# chunks parsed at once by preprocess and shards mapped at once through the vocabularies (threads: polars and numpy
# release the GIL)
PARSE_THREADS = 2
MAP_BLOCK_ROWS = 1 << 14  # rows of a shard's lists mapped through their vocabulary at a time


def split_draw(seed: int, file_index: int, line_numbers: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per (seed, file, line), independent of chunking (splitmix64)."""
    with np.errstate(over="ignore"):
        x = line_numbers.astype(np.uint64) + np.uint64((seed * 1_000_003 + file_index) & 0xFFFFFFFF) * np.uint64(
            0x9E3779B97F4A7C15
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


# np.load parses each file's header with ast.literal_eval, and CPython 3.11's compiler is not safe to run from several
# threads at once ("SystemError: AST constructor recursion depth mismatch", seen in a clean-clone test run): the
# mapping threads load one file at a time
_NPY_LOAD = threading.Lock()


def _load_npy(path: Path, mmap_mode: Optional[str] = None) -> np.ndarray:
    with _NPY_LOAD:
        return np.load(path, mmap_mode=mmap_mode)


def describe_files(files_by_split: Dict[str, Sequence[str | os.PathLike]]) -> List[Dict]:
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
        "inputs": describe_files(files_by_split),
        **split_options,
    }


class ShardWriter:
    """Gathers accepted rows per split and writes them as shards of about ``shard_rows`` rows into ``work``.

    Per shard: ``dense``, ``sparse`` (the single-ID columns), ``labels``, ``keys`` and, with list columns,
    ``lists`` (int32 [n, sum of max_length]: each list's rows padded with 0 after its length, side by side in
    ``categorical`` order) and ``list_lengths`` (int32 [n, lists]). Vocabulary columns hold 0 until ``finish``
    maps the tokens kept beside them (``tokens``, ``list_tokens``: flat, list after list) through the vocabularies.
    """

    def __init__(self, work: Path, splits: List[str], schema: DatasetSchema, shard_rows: int) -> None:
        self.work, self.shard_rows = work, shard_rows
        self.frequency_features = [f for f in schema.single_id_columns if not schema.vocabulary_rule(f).is_hash]
        self.lists = {f: schema.lists[f] for f in schema.list_columns}
        self.frequency_lists = [f for f in self.lists if not schema.vocabulary_rule(f).is_hash]
        # the vocabularies built: of each min_count column that owns one (a list sharing a column counts into it)
        self.vocabularies = [
            f for f in schema.categorical if not schema.vocabulary_rule(f).is_hash and schema.vocabulary_owner(f) == f
        ]
        self.vocabulary_of = {f: schema.vocabulary_owner(f) for f in [*self.frequency_features, *self.frequency_lists]}
        self.key_columns = schema.key_columns
        self.counter = TokenCounter(self.vocabularies)
        self.pending: Dict[str, List[Tuple[Tuple[np.ndarray, ...], Dict[str, ListValues]]]] = {s: [] for s in splits}
        self.shards: Dict[str, List[Dict]] = {split: [] for split in splits}
        self.rows = {split: 0 for split in splits}
        self.label_sums = {split: np.zeros(len(schema.labels)) for split in splits}
        self.label_counts = {split: np.zeros(len(schema.labels), dtype=np.int64) for split in splits}
        for split in splits:
            (work / split).mkdir()

    def training_tokens(self, parsed: ParsedChunk, train: np.ndarray) -> Dict[str, List[np.ndarray]]:
        """The raw tokens of the training rows (``train``: a mask) that each vocabulary counts."""
        tokens: Dict[str, List[np.ndarray]] = {}
        for i, feature in enumerate(self.frequency_features):
            tokens.setdefault(self.vocabulary_of[feature], []).append(parsed.tokens[train, i])
        for feature in self.frequency_lists:
            tokens.setdefault(self.vocabulary_of[feature], []).append(parsed.lists[feature].take(train).values)
        return tokens

    def add(self, split: str, parsed: ParsedChunk, rows: np.ndarray) -> None:
        arrays = (parsed.dense, parsed.sparse, parsed.labels, parsed.tokens, parsed.keys)
        lists = {f: values.take(rows) for f, values in parsed.lists.items()}
        self.pending[split].append((tuple(array[rows] for array in arrays), lists))
        if sum(len(part[0]) for part, _ in self.pending[split]) >= self.shard_rows:
            self.flush(split)

    def flush(self, split: str) -> None:
        if not self.pending[split]:
            return
        pending = self.pending[split]
        dense, sparse, labels, tokens, keys = (np.concatenate(arrays) for arrays in zip(*[a for a, _ in pending]))
        self.pending[split] = []
        name = f"part-{len(self.shards[split]):05d}"
        for part, array in (("dense", dense), ("sparse", sparse), ("labels", labels)):
            _save_npy(self.work / split / f"{name}.{part}.npy", array)
        if self.frequency_features:
            _save_npy(self.work / split / f"{name}.tokens.npy", tokens)
        if self.key_columns:
            _save_npy(self.work / split / f"{name}.keys.npy", keys)
        if self.lists:
            self._write_lists(self.work / split / name, [parts for _, parts in pending], len(dense))
        self.shards[split].append({"name": name, "rows": len(dense)})
        self.rows[split] += len(dense)
        present = ~np.isnan(labels)
        self.label_sums[split] += np.where(present, labels, 0.0).sum(axis=0)
        self.label_counts[split] += present.sum(axis=0)

    def _list_columns(self, feature: str) -> slice:
        """The columns of ``feature`` in a shard's ``lists`` array."""
        start = 0
        for name, spec in self.lists.items():
            if name == feature:
                return slice(start, start + spec.max_length)
            start += spec.max_length
        raise KeyError(feature)

    def _write_lists(self, shard: Path, parts: List[Dict[str, ListValues]], rows: int) -> None:
        """A shard's ``lists`` and ``list_lengths`` and (vocabulary lists) ``list_tokens``, filled chunk by chunk
        into the arrays written, so the shard's lists are held once: hashed lists are rows already, a vocabulary
        list's place stays 0 until ``finish`` maps its tokens."""
        values = np.zeros((rows, sum(spec.max_length for spec in self.lists.values())), dtype=np.int32)
        lengths = np.zeros((rows, len(self.lists)), dtype=np.int32)
        start = 0
        for part in parts:
            end = start + len(next(iter(part.values())).lengths)
            for i, feature in enumerate(self.lists):
                lengths[start:end, i] = part[feature].lengths
                if feature not in self.frequency_lists:
                    part[feature].fill(values[start:end, self._list_columns(feature)])
            start = end
        _save_npy(shard.with_suffix(".lists.npy"), values)
        _save_npy(shard.with_suffix(".list_lengths.npy"), lengths)
        if self.frequency_lists:  # list after list, each row after row
            total = sum(len(part[f].values) for f in self.frequency_lists for part in parts)
            tokens = np.lib.format.open_memmap(shard.with_suffix(".list_tokens.npy"), "w+", np.int64, (total,))
            start = 0
            for feature in self.frequency_lists:
                for part in parts:
                    tokens[start : start + len(part[feature].values)] = part[feature].values
                    start += len(part[feature].values)
            tokens.flush()
            del tokens

    def _map_list_tokens(self, shard: Path, vocabularies: Dict[str, np.ndarray]) -> None:
        """Write a shard's vocabulary lists' rows into its ``lists`` (in place, a block of rows at a time, so
        memory stays a block's whatever the shard's size) and drop their raw tokens."""
        values = _load_npy(shard.with_suffix(".lists.npy"), mmap_mode="r+")
        lengths = _load_npy(shard.with_suffix(".list_lengths.npy"))
        tokens = _load_npy(shard.with_suffix(".list_tokens.npy"), mmap_mode="r")
        start = 0
        for feature in self.frequency_lists:
            feature_lengths = lengths[:, list(self.lists).index(feature)]
            ends = start + np.cumsum(feature_lengths, dtype=np.int64)
            vocabulary = vocabularies[self.vocabulary_of[feature]]
            for first in range(0, len(feature_lengths), MAP_BLOCK_ROWS):
                last = min(first + MAP_BLOCK_ROWS, len(feature_lengths))
                block = slice(int(ends[first - 1]) if first else start, int(ends[last - 1]))
                rows = ListValues(tokens_to_rows(tokens[block], vocabulary), feature_lengths[first:last])
                rows.fill(values[first:last, self._list_columns(feature)])
            start = int(ends[-1]) if len(ends) else start
        values.flush()
        del values, tokens
        shard.with_suffix(".list_tokens.npy").unlink()

    def finish(self, schema: DatasetSchema) -> Dict[str, int]:
        """Flush, build the ``min_count`` vocabularies from the training split, map every shard's tokens through
        them, and return each categorical feature's table size (a list sharing a column: that column's)."""
        for split in self.pending:
            self.flush(split)
        vocabularies: Dict[str, np.ndarray] = {}
        for owner in self.vocabularies:
            vocabularies[owner] = self.counter.vocabulary(owner, schema.vocabulary_rule(owner).min_count)
            _save_npy(self.work / "vocab" / f"{owner}.npy", vocabularies[owner])
        table_sizes = {}
        for feature in schema.categorical:
            rule, owner = schema.vocabulary_rule(feature), schema.vocabulary_owner(feature)
            table_sizes[feature] = rule.hash_size if rule.is_hash else len(vocabularies[owner]) + 1
        single_columns = [
            (schema.single_id_columns.index(f), vocabularies[self.vocabulary_of[f]]) for f in self.frequency_features
        ]

        def map_tokens(shard_path: Path) -> None:
            if single_columns:
                sparse_path, tokens_path = (shard_path.with_suffix(f".{part}.npy") for part in ("sparse", "tokens"))
                sparse, tokens = _load_npy(sparse_path), _load_npy(tokens_path)
                for t, (column, vocabulary) in enumerate(single_columns):
                    sparse[:, column] = tokens_to_rows(tokens[:, t], vocabulary)
                _save_npy(sparse_path, sparse)
                tokens_path.unlink()
            if self.frequency_lists:
                self._map_list_tokens(shard_path, vocabularies)

        if vocabularies:
            paths = [self.work / split / s["name"] for split, shards in self.shards.items() for s in shards]
            with ThreadPoolExecutor(max_workers=PARSE_THREADS) as pool:
                list(pool.map(map_tokens, paths))
        return table_sizes

    def label_means(self, split: str, labels: List[str]) -> Dict[str, Optional[float]]:
        sums, counts = self.label_sums[split], self.label_counts[split]
        return {name: (float(sums[i] / counts[i]) if counts[i] else None) for i, name in enumerate(labels)}
