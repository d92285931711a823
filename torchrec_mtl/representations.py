"""User and item vectors out of a model trained with a retrieval task: written keyed by the original IDs, read back.

``export_representations`` runs the checkpoint's two towers (torchrec_mtl.modules.two_tower) once per user and once
per item and writes to ``out_dir``:

- ``users.npz``: ``ids`` (the user IDs as the log writes them), ``keys`` (their integers, as preprocessing parses
  them), ``vectors`` float32 [users, dim]: every user of the training split, from the user-side features of the
  user's last training row;
- ``items.npz``: ``ids``, ``keys``, ``vectors``, and ``seen`` (the item appears in the training split): every item of
  the items file when the model reads item text, so an item never seen in training gets a vector from its
  description (its ID falls to the unseen-ID row); without text, every item of the training split;
- ``manifest.json``: the checkpoint, the towers' features, the counts, how to read them.

A tower may read list features (a user's history): a user's come from the lists of the user's last training row, an
item's from its last training row's (a cold item's lists are empty).

Vectors have unit length, so a dot product is the model's user-item score and a cosine; the item matrix can go
straight into a nearest-neighbour index (``faiss.IndexFlatIP(dim).add(items.vectors)``).

Example::

    >>> export_representations("runs/retrieval/checkpoints", "runs/retrieval/vectors")  # doctest: +SKIP
    (or: torchrec-mtl vectors --checkpoint runs/retrieval/checkpoints --out runs/retrieval/vectors)
    >>> vectors = Representations.load("runs/retrieval/vectors")  # doctest: +SKIP
    >>> vectors.items.nearest(vectors.users.vector("3b216ca4"), k=10)  # doctest: +SKIP
    (array(['6ac30ad3', ...]), array([0.83, ...], dtype=float32))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from torchrec_mtl.data.prepare import shards_dir
from torchrec_mtl.data.preprocess import tokens_to_rows
from torchrec_mtl.data.shards import EncodedLog, ListColumn, ShardedLog
from torchrec_mtl.device import DEFAULT_DEVICE
from torchrec_mtl.inference import TrainedModel, load_trained, one_id_per_feature, with_lists
from torchrec_mtl.modules.item_text import ITEM_TEXT_FEATURE
from torchrec_mtl.outputs import new_folder
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.train.checkpoint import CheckpointError
from torchrec_mtl.progress import bar_disabled

BATCH_ROWS = 8192


@dataclass
class VectorTable:
    """IDs with one unit-length vector each; ``vector(id)`` and ``nearest(query, k)`` by dot product."""

    ids: np.ndarray  # str
    keys: np.ndarray  # int64
    vectors: np.ndarray  # float32 [N, dim]

    def __post_init__(self) -> None:
        self._position = {str(i): n for n, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def vector(self, id: str) -> np.ndarray:
        if str(id) not in self._position:
            raise KeyError(f"{id!r} has no vector (not among the {len(self):,} exported)")
        return self.vectors[self._position[str(id)]]

    def nearest(
        self, query: np.ndarray, k: int = 10, exclude: Optional[List[str]] = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` IDs with the highest ``query . vector`` (best first) and their scores, leaving out ``exclude``."""
        scores = self.vectors @ np.asarray(query, dtype=np.float32)
        if exclude:
            scores[[self._position[str(i)] for i in exclude if str(i) in self._position]] = -np.inf
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return self.ids[top], scores[top]


@dataclass
class Representations:
    """What ``export_representations`` wrote: ``users``, ``items`` (``seen``: in the training split) and the
    manifest."""

    users: VectorTable
    items: VectorTable
    items_seen: np.ndarray
    manifest: Dict

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Representations":
        directory = Path(directory)
        missing = [n for n in ("users.npz", "items.npz", "manifest.json") if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"{directory}: no {', '.join(missing)}; write them with `torchrec-mtl vectors`")
        users, items = (np.load(directory / f"{side}.npz") for side in ("users", "items"))
        return cls(
            VectorTable(users["ids"], users["keys"], users["vectors"]),
            VectorTable(items["ids"], items["keys"], items["vectors"]),
            items["seen"],
            json.loads((directory / "manifest.json").read_text()),
        )


def format_keys(keys: np.ndarray, categorical_format: str) -> np.ndarray:
    """Integer keys back to the log's IDs: 8 lowercase hex digits (Criteo's hashes) or decimal."""
    pattern = "{:08x}" if categorical_format == "hex" else "{:d}"
    return np.array([pattern.format(int(k)) for k in keys])


def feature_rows(data_dir: Path, schema: DatasetSchema, feature: str, keys: np.ndarray) -> np.ndarray:
    """The table rows preprocessing gives raw ``keys`` of ``feature``: through the saved vocabulary (0: rare or
    unseen), or the hash rule ``1 + key % (hash_size - 1)`` (0: empty)."""
    rule = schema.vocabulary_rule(feature)
    if rule.is_hash:
        return np.where(keys >= 0, 1 + keys % (rule.hash_size - 1), 0)
    return tokens_to_rows(keys, np.load(data_dir / "vocab" / f"{feature}.npy"))


def positions(keys: np.ndarray, table_keys: np.ndarray) -> np.ndarray:
    """The position of each of ``keys`` in ``table_keys`` (any order), -1 where it is not there.

    Example::

        >>> positions(np.array([7, 3, 9]), np.array([3, 5, 7]))
        array([ 2,  0, -1])
    """
    if not len(table_keys):
        return np.full(len(keys), -1)
    order = np.argsort(table_keys, kind="stable")
    found = np.clip(np.searchsorted(table_keys[order], keys), 0, len(order) - 1)
    return np.where(table_keys[order][found] == keys, order[found], -1)


def ranking_metrics(scores: np.ndarray, relevant: Sequence[np.ndarray], k: int) -> Dict[str, float]:
    """Mean recall@k and NDCG@k over users: ``scores`` [users, items] (-inf: left out), ``relevant[u]`` the held-out
    item positions of user u (non-empty). recall@k is the share of the user's relevant items in the top k, NDCG@k
    the discounted gain of the hits over the best possible; ties in the ranking keep item order.

    Example::

        >>> ranking_metrics(np.array([[0.9, 0.1, 0.5]]), [np.array([2])], k=2)  # item 2 ranked second
        {'recall@2': 1.0, 'ndcg@2': 0.6309297535714575}
    """
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall, ndcg = [], []
    for user, items in enumerate(relevant):
        hits = np.isin(top[user], items)
        recall.append(hits.sum() / len(items))
        ndcg.append((hits * discounts).sum() / discounts[: min(len(items), k)].sum())
    return {f"recall@{k}": float(np.mean(recall)), f"ndcg@{k}": float(np.mean(ndcg))}


def _last_rows(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct keys (sorted) and the index of each one's last row."""
    distinct, first_from_end = np.unique(keys[::-1], return_index=True)
    return distinct, len(keys) - 1 - first_from_end


def _vectors(
    trained: TrainedModel,
    sparse_ids: np.ndarray,
    lists: Dict[str, ListColumn],
    side: int,
    progress: bool,
    what: str,
) -> np.ndarray:
    """One tower's vectors of encoded rows: ``sparse_ids`` [n, single-ID features] table rows, ``lists`` the rows'
    lists (each list feature of the model; empty where the tower does not read it)."""
    features: List[str] = trained.inputs["features"]
    list_features = list(trained.lists)
    single = [f for f in features if f not in trained.lists]
    model = trained.inference.model
    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(sparse_ids), BATCH_ROWS), desc=what, disable=bar_disabled(progress)):
            rows = np.arange(start, min(start + BATCH_ROWS, len(sparse_ids)))
            ids = torch.from_numpy(sparse_ids[rows].astype(np.int64)).to(trained.device)
            if list_features:
                flat = [lists[f].flat(rows) for f in list_features]
                values = torch.from_numpy(np.concatenate([v for v, _ in flat]).astype(np.int64)).to(trained.device)
                lengths = torch.from_numpy(np.stack([n for _, n in flat]).astype(np.int32)).to(trained.device)
                kjt = with_lists(single, list_features, ids, values, lengths)
            else:
                kjt = one_id_per_feature(features, ids)
            # to the host, where the vectors are written
            parts.append(model.retrieval_vectors(kjt)[side].cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, trained.config.model.retrieval.dim), np.float32)


def _tower_inputs(
    trained: TrainedModel, train: EncodedLog, tower: List[str], last: np.ndarray, count: int, known: np.ndarray
) -> Tuple[np.ndarray, Dict[str, ListColumn]]:
    """The inputs of ``count`` rows of which those ``known`` take the ``tower`` features of the training rows
    ``last`` (one per known row): single IDs from the shards' sparse columns (the single-ID features, in order:
    a list before a feature does not shift it) and lists from the shards' lists; every other input is row 0 or an
    empty list."""
    single = [f for f in trained.inputs["features"] if f not in trained.lists]
    sparse = np.zeros((count, len(single)), dtype=np.int64)
    lists = {f: ListColumn(np.zeros((count, spec.max_length), np.int32), np.zeros(count, np.int32))
             for f, spec in trained.lists.items()}  # fmt: skip
    for feature in tower:
        if feature in lists:
            lists[feature].values[known] = train.lists[feature].values[last]
            lists[feature].lengths[known] = train.lists[feature].lengths[last]
        else:  # the shards' sparse columns are these single-ID features, in order (the item-text row comes after)
            column = single.index(feature)
            sparse[known, column] = train.sparse[last, column]
    return sparse, lists


def export_representations(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: bool = True,
    device: str | torch.device = DEFAULT_DEVICE,
) -> Dict:
    """Write every user's and item's vector (see the module docstring), the model run on ``device``; returns the
    manifest."""
    trained = load_trained(checkpoint, device)
    config, inputs = trained.config, trained.inputs
    if inputs.get("retrieval") is None:
        raise CheckpointError(
            f"{trained.checkpoint}: the model has no retrieval task, so no user and item vectors (declare one: "
            "objective.tasks.<name>: {kind: retrieval, label: click})"
        )
    user_features, item_features = inputs["retrieval"]
    features: List[str] = inputs["features"]
    schema = DatasetSchema.from_yaml(config.data.schema)
    data = shards_dir(config.data)
    train = EncodedLog.concat(ShardedLog.open(data).split("train"))

    single = [f for f in features if f not in trained.lists]
    user_keys, user_last = _last_rows(train.keys[schema.user_id])
    every_user = np.ones(len(user_keys), dtype=bool)
    user_ids, user_lists = _tower_inputs(trained, train, user_features, user_last, len(user_keys), every_user)
    users = _vectors(trained, user_ids, user_lists, 0, progress, "user vectors")

    item_column = schema.item_id
    seen_keys, item_last = _last_rows(train.keys[item_column])
    if inputs["item_text"] is not None:
        from torchrec_mtl.text.table import parse_item_keys, read_items

        items_file = Path(config.data.dir) / config.model.text.items
        item_names, _ = read_items(items_file)
        item_keys = parse_item_keys(item_names, schema.categorical_format, items_file)
        item_names = np.array(item_names)
    else:
        item_keys, item_names = seen_keys, format_keys(seen_keys, schema.categorical_format)
    position = positions(item_keys, seen_keys)
    seen = position >= 0
    # another item-side feature: the item's last training row's, row 0 (or an empty list) for a cold item
    others = [f for f in item_features if f != item_column]
    item_ids, item_lists = _tower_inputs(trained, train, others, item_last[position[seen]], len(item_keys), seen)
    if item_column in item_features:
        item_ids[:, single.index(item_column)] = feature_rows(data, schema, item_column, item_keys)
    if inputs["item_text"] is not None:
        item_ids[:, single.index(ITEM_TEXT_FEATURE)] = np.arange(1, len(item_keys) + 1)  # row 1 + i: item i
    items = _vectors(trained, item_ids, item_lists, 1, progress, "item vectors")

    with new_folder(out_dir, "vectors", inputs=[trained.checkpoint, data]) as out:
        user_ids = format_keys(user_keys, schema.categorical_format)
        np.savez(out / "users.npz", ids=user_ids, keys=user_keys, vectors=users)
        np.savez(out / "items.npz", ids=item_names, keys=item_keys, vectors=items, seen=seen)
        manifest = {
            "checkpoint": str(trained.checkpoint),
            "dim": int(users.shape[1]),
            "users": {"count": len(user_keys), "features": user_features},
            "items": {
                "count": len(item_keys),
                "seen_in_training": int(seen.sum()),
                "features": item_features + ([ITEM_TEXT_FEATURE] if inputs["item_text"] is not None else []),
            },
            "score": "dot product of unit vectors (a cosine): the model's user-item retrieval score",
            "read": "from torchrec_mtl.representations import Representations; Representations.load(dir)",
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
