"""Writing shards: the split each line is drawn into, the shard files per split, the vocabularies built at the
end, and the fingerprint of the inputs that a set of shards was made from.

Example::

    >>> split_draw(0, 0, np.arange(1, 4)) < 0.2  # which of lines 1-3 of the first file go to test
    array([False, False,  True])
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_mtl.data.preprocess.parse import ParsedChunk
from torchrec_mtl.data.preprocess.vocab import TokenCounter, tokens_to_rows
from torchrec_mtl.schema import DatasetSchema

FORMAT_VERSION = 2  # of the shards and metadata.json (torchrec_mtl.data.shards refuses other versions)
# chunks parsed at once by preprocess and shards mapped at once through the vocabularies (threads: polars and numpy
# release the GIL)
PARSE_THREADS = 2


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
    """Gathers accepted rows per split and writes them as shards of about ``shard_rows`` rows into ``work``."""

    def __init__(self, work: Path, splits: List[str], schema: DatasetSchema, shard_rows: int) -> None:
        self.work, self.shard_rows = work, shard_rows
        self.frequency_features = [f for f in schema.categorical if not schema.vocabulary_rule(f).is_hash]
        self.key_columns = schema.key_columns
        self.counter = TokenCounter(self.frequency_features)
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
                sparse[:, column] = tokens_to_rows(tokens[:, t], vocabulary)
            _save_npy(sparse_path, sparse)
            tokens_path.unlink()

        if vocabularies:
            paths = [self.work / split / s["name"] for split, shards in self.shards.items() for s in shards]
            with ThreadPoolExecutor(max_workers=PARSE_THREADS) as pool:
                list(pool.map(map_tokens, paths))
        return table_sizes

    def label_means(self, split: str, labels: List[str]) -> Dict[str, Optional[float]]:
        sums, counts = self.label_sums[split], self.label_counts[split]
        return {name: (float(sums[i] / counts[i]) if counts[i] else None) for i, name in enumerate(labels)}
