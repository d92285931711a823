"""Batches of an encoded log for one rank, with the same number of batches on every rank.

TorchRec's pipelines hang when ranks see different batch counts, so the rule for the tail is fixed:

- training (``pad_tail=False``): each epoch is a seeded permutation of the rows; the last
  ``len % (world_size * batch_size)`` rows of that permutation are skipped for the epoch (a different set each epoch).
- evaluation (``pad_tail=True``): every row is used once; the tail is padded with copies of row 0 whose
  ``row_weight`` is 0, so they count in no loss and no metric.

Rank r takes the r-th of every ``world_size`` consecutive batches.

Example::

    >>> loader = BatchLoader(encoded, feature_names, batch_size=1024, rank=0, world_size=2, seed=0)  # doctest: +SKIP
    >>> loader.set_epoch(1); batches = list(loader)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Iterator, List

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.data.logs import EncodedLog


class BatchLoader:
    def __init__(
        self,
        log: EncodedLog,
        feature_names: List[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad_tail: bool = False,
        seed: int = 0,
    ) -> None:
        if len(feature_names) != log.sparse.shape[1]:
            raise ValueError(f"{len(feature_names)} feature names for {log.sparse.shape[1]} sparse columns")
        self.log, self.feature_names = log, feature_names
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.pad_tail, self.seed = shuffle, pad_tail, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields: the same on every rank."""
        global_batches = len(self.log) / (self.batch_size * self.world_size)
        return math.ceil(global_batches) if self.pad_tail else math.floor(global_batches)

    def _row_order(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.log)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        used = len(self) * self.batch_size * self.world_size
        weight = np.ones(used, dtype=np.float32)
        if used > n:
            weight[n:] = 0.0
            order = np.concatenate([order, np.zeros(used - n, dtype=order.dtype)])
        return order[:used], weight

    def __iter__(self) -> Iterator[MultiTaskBatch]:
        order, weight = self._row_order()
        for batch_index in range(len(self)):
            start = (batch_index * self.world_size + self.rank) * self.batch_size
            rows = order[start : start + self.batch_size]
            yield self._batch(rows, weight[start : start + self.batch_size])

    def _batch(self, rows: np.ndarray, weight: np.ndarray) -> MultiTaskBatch:
        ids = torch.from_numpy(self.log.sparse[rows].T.reshape(-1))
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=self.feature_names,
            values=ids,
            lengths=torch.ones(ids.numel(), dtype=torch.int32),
        )
        return MultiTaskBatch(
            dense_features=torch.from_numpy(self.log.dense[rows]),
            sparse_features=sparse,
            labels={name: torch.from_numpy(values[rows]) for name, values in self.log.labels.items()},
            row_weight=torch.from_numpy(weight),
        )
