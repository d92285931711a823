#!/usr/bin/env python3
"""Retrieval from the exported user and item vectors against a popularity baseline: the synthetic default and
MovieLens latest-small.

For each dataset, one run of the main job with a retrieval task (``configs/retrieval_<dataset>.yaml``; reused when
its results are already there), then its vectors exported (torchrec_mtl.representations). The held-out interactions
are the test split's clicked (user, item) pairs whose item the user did not click in training. For every test user
with one, all items of the items file (cold ones included) are ranked:

- ``ours``: by ``user vector . item vector``;
- ``popularity``: by the item's number of clicks in training;
- with ``--baselines``, ``expected_clicks``: a hand-made personalised score (the item's impressions x the user's
  click rate on its category x its click rate), to show how much room there is above popularity;

with the items the user clicked in training left out of both rankings. ``recall@k`` is the share of the user's
held-out items in the top k, ``ndcg@k`` the discounted gain of the hits over the best possible; both are averaged
over users.

On the synthetic data, whose items have a planted category, the item vectors are also checked for it: the share of
each item's 10 nearest neighbours (by cosine, itself left out) that share its category, over all items and over the
items never seen in training (their vectors come from text alone), against chance (the share an arbitrary neighbour
would have).

Writes a JSON list of rows with keys ``dataset``, ``method`` (``ours`` or ``popularity``), ``metric`` and ``value``
(the category rows add ``chance``), and prints the table. A benchmark run by hand (the synthetic run takes 3-4 min
on 2 cores); not part of CI.

Example::

    .venv/bin/python tools/eval_representations.py --out runs/eval_representations.json
    .venv/bin/python tools/eval_representations.py --datasets movielens --out /tmp/representations.json  # quicker
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

TOOLS = str(Path(__file__).resolve().parent)
if TOOLS not in sys.path:  # loaded from its file (tests/test_retrieval.py), not run as a script
    sys.path.insert(0, TOOLS)

from common import ONE_PASS, ensure_movielens, quiet, run_or_reuse, save_rows  # noqa: E402
from torchrec_mtl.config import JobConfig, load_config  # noqa: E402
from torchrec_mtl.data.prepare import shards_dir  # noqa: E402
from torchrec_mtl.data.shards import EncodedLog, ShardedLog  # noqa: E402
from torchrec_mtl.representations import (  # noqa: E402
    Representations,
    export_representations,
    positions,
    ranking_metrics,
)
from torchrec_mtl.schema import DatasetSchema  # noqa: E402

CONFIGS = {"synthetic": "configs/retrieval_synthetic.yaml", "movielens": "configs/retrieval_movielens.yaml"}
CATEGORY_COLUMNS = {"synthetic": "C3", "movielens": "genre1"}  # for the --baselines expected-clicks score
NEIGHBOURS = 10


def _clicked_pairs(log: EncodedLog, user_column: str, item_column: str, label: str) -> np.ndarray:
    """The distinct (user key, item key) pairs of the rows whose ``label`` is 1, as an [N, 2] array."""
    clicked = log.labels[label] == 1
    return np.unique(np.stack([log.keys[user_column][clicked], log.keys[item_column][clicked]], axis=1), axis=0)


def _expected_clicks(
    train: EncodedLog, users: np.ndarray, items: np.ndarray, schema: DatasetSchema, category_column: str, label: str
) -> Callable[[np.ndarray], np.ndarray]:
    """A hand-made baseline, scoring (user, item) by expected clicks: the item's training impressions x the user's
    click rate on the item's category x the item's click rate (rates smoothed by 1 click in 10 rows)."""
    user_rows, item_rows = positions(train.keys[schema.user_id], users), positions(train.keys[schema.item_id], items)
    known = (user_rows >= 0) & (item_rows >= 0)
    clicked = (train.labels[label] == 1)[known]
    category_values = train.sparse[known, schema.categorical.index(category_column)]
    category = np.zeros(len(items), dtype=np.int64)
    category[item_rows[known]] = category_values
    shown = np.zeros((len(users), category.max() + 1))
    clicks = np.zeros_like(shown)
    np.add.at(shown, (user_rows[known], category[item_rows[known]]), 1.0)
    np.add.at(clicks, (user_rows[known], category[item_rows[known]]), clicked)
    user_category_rate = (clicks + 1.0) / (shown + 10.0)
    impressions = np.bincount(item_rows[known], minlength=len(items)).astype(np.float64)
    item_rate = (np.bincount(item_rows[known], weights=clicked, minlength=len(items)) + 1.0) / (impressions + 10.0)
    return lambda block: impressions * item_rate * user_category_rate[block][:, category]


def retrieval_rows(
    dataset: str, config: JobConfig, vectors: Representations, k: int = 50, baseline_category: Optional[str] = None
) -> List[Dict]:
    """recall@k and ndcg@k of ``ours`` and ``popularity`` (see the module docstring), and of ``expected_clicks``
    (``_expected_clicks``) with a ``baseline_category`` column."""
    schema = DatasetSchema.from_yaml(config.data.schema)
    log = ShardedLog.open(shards_dir(config.data))
    train, test = (EncodedLog.concat(log.split(name)) for name in ("train", "test"))
    label = config.objective.tasks["retrieval"].label
    train_pairs = _clicked_pairs(train, schema.user_id, schema.item_id, label)
    test_pairs = _clicked_pairs(test, schema.user_id, schema.item_id, label)

    users, items = vectors.users, vectors.items
    seen_before = {tuple(pair) for pair in train_pairs.tolist()}
    held_out = np.array([pair for pair in test_pairs.tolist() if tuple(pair) not in seen_before]).reshape(-1, 2)
    user_rows, item_rows = positions(held_out[:, 0], users.keys), positions(held_out[:, 1], items.keys)
    held_out, user_rows, item_rows = held_out[user_rows >= 0], user_rows[user_rows >= 0], item_rows[user_rows >= 0]
    evaluated = np.unique(user_rows)
    relevant = [item_rows[(user_rows == u) & (item_rows >= 0)] for u in evaluated]
    keep = [i for i, r in enumerate(relevant) if len(r)]
    evaluated, relevant = evaluated[keep], [relevant[i] for i in keep]

    clicked_items = positions(train.keys[schema.item_id][train.labels[label] == 1], items.keys)
    clicks = np.bincount(clicked_items[clicked_items >= 0], minlength=len(items)).astype(np.float64)
    scorers: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "ours": lambda block: users.vectors[block] @ items.vectors.T,
        "popularity": lambda block: np.tile(clicks, (len(block), 1)),
    }
    if baseline_category is not None:
        scorers["expected_clicks"] = _expected_clicks(train, users.keys, items.keys, schema, baseline_category, label)
    train_user_rows, train_item_rows = (
        positions(train_pairs[:, 0], users.keys),
        positions(train_pairs[:, 1], items.keys),
    )
    rows = []
    for method, scorer in scorers.items():
        scores = []
        for start in range(0, len(evaluated), 1024):  # a block of users at a time: [users, items] floats
            block = evaluated[start : start + 1024]
            block_scores = scorer(block).astype(np.float64)
            mine = np.isin(train_user_rows, block) & (train_item_rows >= 0)
            block_scores[np.searchsorted(block, train_user_rows[mine]), train_item_rows[mine]] = -np.inf
            scores.append(block_scores)
        values = ranking_metrics(np.concatenate(scores), relevant, k)
        for metric, value in values.items():
            rows.append({"dataset": dataset, "method": method, "metric": metric, "value": round(value, 4),
                         "users": len(evaluated), "items": len(items)})  # fmt: skip
    return rows


def category_rows(dataset: str, config: JobConfig, vectors: Representations, category_column: str) -> List[Dict]:
    """The share of each item's nearest neighbours in its planted category, over all items and over cold items."""
    schema = DatasetSchema.from_yaml(config.data.schema)
    log = ShardedLog.open(shards_dir(config.data))
    both = EncodedLog.concat([*log.split("train"), *log.split("test")])
    column = log.categorical_features.index(category_column)
    item_rows = positions(both.keys[schema.item_id], vectors.items.keys)
    category = np.full(len(vectors.items), -1, dtype=np.int64)
    category[item_rows[item_rows >= 0]] = both.sparse[item_rows >= 0, column]
    known = np.flatnonzero(category >= 0)
    similarity = vectors.items.vectors[known] @ vectors.items.vectors[known].T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :NEIGHBOURS]
    same = (category[known][neighbours] == category[known][:, None]).mean(axis=1)
    counts = np.bincount(category[known])
    chance = (counts[category[known]] - 1) / (len(known) - 1)
    cold = ~vectors.items_seen[known]
    rows = []
    for metric, mask in (
        (f"same_category@{NEIGHBOURS}", np.ones_like(cold)),
        (f"cold_same_category@{NEIGHBOURS}", cold),
    ):
        if mask.any():
            value, expected = round(float(same[mask].mean()), 4), round(float(chance[mask].mean()), 4)
            rows.append({"dataset": dataset, "method": "ours", "metric": metric, "value": value, "chance": expected,
                         "items": int(mask.sum())})  # fmt: skip
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = [f"{'dataset':<10}{'method':<17}{'metric':<26}{'value':>8}{'chance':>8}"]
    for row in rows:
        chance = f"{row['chance']:8.4f}" if "chance" in row else ""
        lines.append(f"{row['dataset']:<10}{row['method']:<17}{row['metric']:<26}{row['value']:8.4f}{chance}")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--k", type=int, default=50, help="the cut-off of recall@k and ndcg@k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    parser.add_argument("--runs", default="runs/eval_representations", help="folder for each dataset's run")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run (key=value)")
    parser.add_argument("--baselines", action="store_true",
                        help="also rank by expected clicks (method expected_clicks; see _expected_clicks)")  # fmt: skip
    args = parser.parse_args(argv)
    quiet()

    rows: List[Dict] = []
    for dataset in args.datasets:
        out_dir = f"{args.runs}/{dataset}"
        overrides = [*ONE_PASS, f"training.seed={args.seed}", f"out_dir={out_dir}", "training.progress=false",
                     *args.set]  # fmt: skip
        config = load_config(CONFIGS[dataset], overrides)
        if dataset == "movielens":
            ensure_movielens(config.data.dir)
        run_or_reuse(config, f"{dataset} with a retrieval task")
        export_representations(f"{out_dir}/checkpoints", f"{out_dir}/vectors", progress=False)
        vectors = Representations.load(f"{out_dir}/vectors")
        rows += retrieval_rows(dataset, config, vectors, args.k, CATEGORY_COLUMNS[dataset] if args.baselines else None)
        if dataset == "synthetic":
            rows += category_rows(dataset, config, vectors, category_column="C3")
    save_rows(rows, args.out, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
