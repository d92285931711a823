"""The real sharded path at world size 2: two gloo processes, table-wise, row-wise and column-wise sharding, and
every interaction kind.

Each run checks predictions and whole-test-set metrics against the unsharded model on the same weights, then trains.
"""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from conftest import free_port
from dist_workers import sharded_matches_unsharded


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "column_wise"])
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
