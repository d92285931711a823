"""Row operations on a split's shards before training: the item-text row column, cold-item masks, a shuffled-label
control, seeded label noise, and the seeded validation hold-out.

Example::

    >>> train, validation = split_validation(log.split("train"), 0.1, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.text.table import ItemTextTable


def with_item_text_rows(shards: List[EncodedLog], table: ItemTextTable, key_column: str) -> List[EncodedLog]:
    """Each shard with one more sparse column: the text-table row of the row's item (``ITEM_TEXT_FEATURE``)."""
    return [
        shard.with_sparse(np.concatenate([shard.sparse, table.rows(shard.keys[key_column])[:, None]], axis=1))
        for shard in shards
    ]


def cold_item_rows(train: List[EncodedLog], test: List[EncodedLog], item_column: str) -> np.ndarray:
    """A mask over the test rows (in order): True where the row's item never appears in the training split."""
    seen = np.unique(np.concatenate([np.unique(shard.keys[item_column]) for shard in train]))
    return ~np.isin(np.concatenate([shard.keys[item_column] for shard in test]), seen)


def shuffled_labels(shards: List[EncodedLog], seed: int) -> List[EncodedLog]:
    """The same rows with the label rows permuted together: features keep nothing to learn from."""
    log = EncodedLog.concat(shards)
    order = np.random.default_rng(seed).permutation(len(log))
    return [log.with_labels({name: values[order] for name, values in log.labels.items()})]


def flipped_labels(shards: List[EncodedLog], shares: Dict[str, float], seed: int) -> List[EncodedLog]:
    """The same rows with a seeded ``share`` of each named binary label's present values flipped (0 <-> 1; a missing
    label stays missing): label noise on purpose (``training.label_noise``). The draws come from a stream of their own
    (``SeedSequence([seed], spawn_key=(2,))``), one row at a time over the shards in order.

    Example::

        >>> log = EncodedLog(np.zeros((1000, 1), np.float32), np.zeros((1000, 1), np.int64), {"click": np.zeros(1000)})
        >>> float(flipped_labels([log], {"click": 0.1}, seed=0)[0].labels["click"].mean())
        0.089
    """
    if not any(shares.values()):
        return shards
    rng = np.random.default_rng(np.random.SeedSequence([seed], spawn_key=(2,)))
    noisy = []
    for shard in shards:
        labels = dict(shard.labels)
        for name, share in shares.items():
            values = labels[name]
            flip = (rng.random(len(values)) < share) & ~np.isnan(values)
            labels[name] = np.where(flip, 1 - values, values).astype(values.dtype)
        noisy.append(shard.with_labels(labels))
    return noisy


def split_validation(
    shards: List[EncodedLog], fraction: float, seed: int
) -> Tuple[List[EncodedLog], List[EncodedLog]]:
    """``(train, validation)``: ``fraction`` of each shard's rows (rounded), drawn by a permutation seeded with
    ``seed``, held out as validation rows; the rest stay for training, in their order. Every rank maps the same shards
    and draws the same rows, so the split is the same on every rank (each then takes its own batches of either).

    Example::

        >>> log = EncodedLog(np.zeros((10, 1), np.float32), np.zeros((10, 1), np.int64), {"click": np.ones(10)})
        >>> train, validation = split_validation([log], 0.2, seed=0)
        >>> len(train[0]), len(validation[0])
        (8, 2)
    """
    if fraction <= 0:
        return shards, []
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for shard in shards:
        held = np.zeros(len(shard), dtype=bool)
        held[rng.permutation(len(shard))[: round(fraction * len(shard))]] = True
        train.append(shard.take(np.flatnonzero(~held)))
        if held.any():
            validation.append(shard.take(np.flatnonzero(held)))
    return train, validation
