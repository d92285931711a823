"""The real sharded path at world size 2: two gloo processes, table-wise, row-wise and column-wise sharding, every
interaction kind, pooled list features (one sharing another column's table) and sequence features (their tables in
a sharded EmbeddingCollection beside the bags).

Each run checks predictions and whole-test-set metrics against the unsharded model on the same weights, then trains.
"""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from conftest import free_port
from dist_workers import sharded_matches_unsharded
from list_logs import write_list_log
from torchrec_mtl.config import SequenceConfig


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_sharded_model_matches_unsharded_at_world_size_2(small_log, sharding_type):
    mp.spawn(
        sharded_matches_unsharded,
        args=(2, free_port(), str(small_log), sharding_type),
        nprocs=2,
        join=True,
    )


@pytest.mark.parametrize("interaction", ["concat", "dcn"])
def test_every_interaction_trains_sharded_and_matches_unsharded(small_log, interaction):
    mp.spawn(
        sharded_matches_unsharded,
        args=(2, free_port(), str(small_log), "table_wise", interaction),
        nprocs=2,
        join=True,
    )


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_pooled_lists_shard_and_match_unsharded(small_log, tmp_path, sharding_type):
    """A mean-pooled history in the item table and a sum-pooled list of its own: row-wise, each rank pools the rows
    it holds and the partial sums meet (a mean divided by the whole list's length, not a shard's)."""
    schema = write_list_log(small_log, tmp_path / "lists")
    mp.spawn(
        sharded_matches_unsharded,
        args=(2, free_port(), str(tmp_path / "lists"), sharding_type, "dot", str(schema)),
        nprocs=2,
        join=True,
    )


@pytest.mark.parametrize("sharding_type, kind", [("table_wise", "din"), ("row_wise", "bst")])
def test_sequence_features_shard_and_match_unsharded(small_log, tmp_path, sharding_type, kind):
    """DIN or BST over the history and its categories (aligned, sharing the item and category tables, which then
    live in an EmbeddingCollection sharded beside the EmbeddingBagCollection): predictions and metrics equal the
    unsharded model's, and the pipeline runs both collections' input distribution."""
    schema = write_list_log(small_log, tmp_path / "lists", categories=True)
    sequence = SequenceConfig(kind=kind, features=["history", "hist_category"])
    mp.spawn(
        sharded_matches_unsharded,
        args=(2, free_port(), str(tmp_path / "lists"), sharding_type, "dot", str(schema), sequence),
        nprocs=2,
        join=True,
    )
