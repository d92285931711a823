"""Batches for one rank from a list of shards, with the same number of batches on every rank.

TorchRec's pipelines hang when ranks see different batch counts, so the rule for the tail is fixed. With N rows,
batch size B and world size W, a global batch is W * B rows and rank r takes the r-th B rows of each:

- training (``pad_tail=False``): ``floor(N / (W * B))`` batches per rank; the rows past the last full global batch
  of the epoch's order are skipped for that epoch (a different set each epoch when shuffling).
- evaluation (``pad_tail=True``): ``ceil(N / (W * B))`` batches per rank; every row is used once and the last global
  batch is padded with copies of a real row whose ``row_weight`` is 0, so they count in no loss and no metric.

``id_dropout`` (feature -> p) replaces a training row's ID in that feature with row 0, the row that unseen and
rare IDs share, with probability p: the model then learns what to predict for an item it has never seen (from its
other features and its text) instead of meeting an untrained row 0 on cold items (DropoutNet, Volkovs et al.,
NeurIPS 2017). Only shuffled (training) batches are touched, with draws from the same seeded stream.
``augmentation`` (torchrec_mtl.data.augment: feature dropout, text mixing) draws from a stream of its own seed.

List features (the shards' ``lists``) ride in the same KeyedJaggedTensor, each row with its own length (0 for an
empty list); single-ID features have length 1. The KeyedJaggedTensor's keys are ``feature_names`` in their order;
the sparse columns are the names that are not lists, in that order. ID dropout and feature dropout act on single-ID
features only: a list is left as it was read (dropping a whole history, or some of its elements, is a choice of its
own, not made here).

Shuffling is deterministic per (seed, epoch) and bounded in memory: the shard order is permuted, then shards are read
into windows of about ``window_rows`` rows whose rows are permuted; rows left over from a window's last global batch
move on to the next window. Every rank walks the same order and builds only its own batches.

Example::

    >>> shards = ShardedLog.open("runs/data/synthetic/shards").split("train")  # doctest: +SKIP
    >>> loader = BatchLoader(shards, ["C1", "C2"], batch_size=1024, rank=0, world_size=2, seed=0)  # doctest: +SKIP
    >>> loader.set_epoch(1); batches = list(loader)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mtl.data.augment import Augmentation
from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.data.shards import EncodedLog


class BatchLoader:
    def __init__(
        self,
        shards: Union[EncodedLog, Sequence[EncodedLog]],
        feature_names: List[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad_tail: bool = False,
        seed: int = 0,
        window_rows: int = 1 << 20,
        id_dropout: Optional[Dict[str, float]] = None,
        pin_memory: bool = False,
        augmentation: Optional[Augmentation] = None,
    ) -> None:
        self.shards = [shards] if isinstance(shards, EncodedLog) else list(shards)
        list_features = set(self.shards[0].lists) if self.shards else set()
        # the sparse columns: the features that are not lists, in feature_names order
        self.single_features = [f for f in feature_names if f not in list_features]
        for shard in self.shards:
            if set(shard.lists) != list_features:
                raise ValueError(f"shards with different list features: {sorted(shard.lists)}, {sorted(list_features)}")
            if len(self.single_features) != shard.sparse.shape[1]:
                raise ValueError(
                    f"{len(self.single_features)} single-ID feature names for {shard.sparse.shape[1]} sparse columns"
                )
        absent = sorted(list_features - set(feature_names))
        if absent:
            raise ValueError(f"feature_names {feature_names} lack the shards' list feature(s) {absent}")
        self.feature_names = feature_names
        for feature, p in (id_dropout or {}).items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"id_dropout[{feature!r}]: {p}; allowed: 0 <= p < 1")
            if feature in list_features and p > 0:
                raise ValueError(f"id_dropout[{feature!r}]: a list feature; only single-ID features are dropped")
        self.id_dropout = {self.single_features.index(f): p for f, p in (id_dropout or {}).items() if p > 0}
        self.augmentation = augmentation
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.pad_tail, self.seed, self.window_rows = shuffle, pad_tail, seed, window_rows
        self.num_rows = sum(len(shard) for shard in self.shards)
        self.epoch = 0
        self.start_batch = 0
        # batches are built on the host, where the shards are mapped; the pipeline copies each to the run's device.
        # For a GPU, page-locked batches let that copy (non_blocking, on TorchRec's own stream) overlap the step
        self.pin_memory = pin_memory
        self._lengths = torch.ones(batch_size * len(feature_names), dtype=torch.int32)  # when there are no lists

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Walk epoch ``epoch``'s order from its ``start_batch``-th batch on (resuming mid-epoch): the batches before
        it are skipped without being built, but their random draws are made, so what follows is what an
        uninterrupted epoch would have yielded."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: {start_batch}; allowed: 0 to {len(self)} (batches in an epoch)")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches this rank yields: the same on every rank."""
        global_batches = self.num_rows / (self.batch_size * self.world_size)
        return math.ceil(global_batches) if self.pad_tail else math.floor(global_batches)

    def row_order(self) -> np.ndarray:
        """For an unshuffled loader: the index (in the shards' concatenated order) of each row this rank yields, batch
        after batch; -1 marks a padding row."""
        if self.shuffle:
            raise ValueError("row_order: only an unshuffled loader yields rows in a fixed order")
        global_batch = self.batch_size * self.world_size
        starts = np.arange(len(self))[:, None] * global_batch + self.rank * self.batch_size
        rows = (starts + np.arange(self.batch_size)).reshape(-1)
        return np.where(rows < self.num_rows, rows, -1)

    def __iter__(self) -> Iterator[MultiTaskBatch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        augment_rng = self.augmentation.generator(self.epoch) if self.augmentation and self.shuffle else None
        shard_order = rng.permutation(len(self.shards)) if self.shuffle else range(len(self.shards))
        global_batch = self.batch_size * self.world_size
        remaining = len(self)
        carried: List[EncodedLog] = []
        carried_rows = 0
        yielded = 0
        for position, shard_index in enumerate(shard_order):
            carried.append(self.shards[shard_index])
            carried_rows += len(self.shards[shard_index])
            last = position == len(self.shards) - 1
            if carried_rows < max(self.window_rows, global_batch) and not last:
                continue
            window = EncodedLog.concat(carried)
            order = rng.permutation(len(window)) if self.shuffle else np.arange(len(window))
            full = min(len(window) // global_batch, remaining)
            for batch in range(full):
                if yielded < self.start_batch:
                    yielded += 1
                    self._skip(rng if self.shuffle else None, augment_rng)
                    continue
                yielded += 1
                start = batch * global_batch + self.rank * self.batch_size
                rows = order[start : start + self.batch_size]
                yield self._batch(window, rows, rng=rng if self.shuffle else None, augment_rng=augment_rng)
            remaining -= full
            leftover = order[full * global_batch :]
            carried, carried_rows = ([window.take(leftover)], len(leftover)) if len(leftover) else ([], 0)
        if remaining and self.pad_tail and carried_rows and yielded >= self.start_batch:
            # the last, partial global batch: real rows first, then weight-0 copies of the first real row
            tail = carried[0]
            rows = np.arange(global_batch)
            weight = (rows < len(tail)).astype(np.float32)
            rows[len(tail) :] = 0
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            yield self._batch(tail, rows[mine], weight[mine])

    def _skip(self, rng: np.random.Generator | None, augment_rng: np.random.Generator | None = None) -> None:
        """Make a skipped batch's random draws (those ``_batch`` would make)."""
        if self.id_dropout and rng is not None:
            for _ in self.id_dropout:
                rng.random(self.batch_size * self.world_size)
        if augment_rng is not None:
            self.augmentation.skip(augment_rng, self.batch_size * self.world_size)

    def _batch(
        self,
        window: EncodedLog,
        rows: np.ndarray,
        weight: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        augment_rng: np.random.Generator | None = None,
    ) -> MultiTaskBatch:
        columns = np.ascontiguousarray(window.sparse[rows].T)  # [single-ID features, B]
        if self.id_dropout and rng is not None:
            # every rank draws the whole global batch's masks, so the stream does not depend on the world size
            for column, p in self.id_dropout.items():
                dropped = rng.random(self.batch_size * self.world_size) < p
                columns[column, dropped[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]] = 0
        drawn = self.augmentation.apply(columns, augment_rng, self.rank, self.world_size) if augment_rng else {}
        if window.lists:
            sparse = self._jagged(columns, window, rows)
        else:
            ids = torch.from_numpy(columns.reshape(-1)).long()
            lengths = self._lengths if ids.numel() == self._lengths.numel() else torch.ones_like(ids, dtype=torch.int32)
            sparse = KeyedJaggedTensor.from_lengths_sync(keys=self.feature_names, values=ids, lengths=lengths)
        batch = MultiTaskBatch(
            dense_features=torch.from_numpy(window.dense[rows]),
            sparse_features=sparse,
            labels={name: torch.from_numpy(values[rows]) for name, values in window.labels.items()},
            row_weight=torch.ones(len(rows)) if weight is None else torch.from_numpy(weight),
            augmentation=drawn,
        )
        return batch.pin_memory() if self.pin_memory else batch

    def _jagged(self, columns: np.ndarray, window: EncodedLog, rows: np.ndarray) -> KeyedJaggedTensor:
        """The batch's features in ``feature_names`` order: a single-ID feature's column with lengths 1, a list
        feature's values of these rows with their lengths."""
        values, lengths = [], []
        single = iter(columns)
        for feature in self.feature_names:
            if feature in window.lists:
                feature_values, feature_lengths = window.lists[feature].flat(rows)
            else:
                feature_values, feature_lengths = next(single), np.ones(len(rows), dtype=np.int32)
            values.append(feature_values)
            lengths.append(feature_lengths)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.feature_names,
            values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        )
