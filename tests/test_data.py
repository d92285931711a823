"""Batching (the rules that decide which rows reach which rank) and the real datasets through their schemas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import REAL_DATA
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.schema import DatasetSchema

SCHEMA = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")


def _log(n: int) -> EncodedLog:
    rows = np.arange(n)
    return EncodedLog(
        dense=np.column_stack([rows] * 13).astype(np.float32),
        sparse=np.column_stack([rows % 7] * 8).astype(np.int64),
        labels={
            "click": (rows % 2).astype(np.float32),
            "conversion": np.zeros(n, np.float32),
            "rating": np.full(n, np.nan, np.float32),
        },
    )


def _row_ids(batches):
    return [int(r) for b in batches for r, w in zip(b.dense_features[:, 0], b.row_weight) if w > 0]


@pytest.mark.parametrize("n", [1000, 1023, 4096, 5])
def test_every_rank_gets_the_same_number_of_batches(n):
    loaders = [BatchLoader(_log(n), SCHEMA.categorical, 64, rank, 2, shuffle=True, seed=1) for rank in (0, 1)]
    counts = [len(list(loader)) for loader in loaders]
    assert counts[0] == counts[1] == len(loaders[0]) == n // 128


def test_training_epoch_skips_a_fresh_tail_and_never_repeats_a_row():
    loaders = [BatchLoader(_log(1000), SCHEMA.categorical, 64, rank, 2, shuffle=True, seed=1) for rank in (0, 1)]
    seen_by_epoch = []
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        rows = _row_ids(loaders[0]) + _row_ids(loaders[1])
        assert len(rows) == len(set(rows)) == 7 * 128
        seen_by_epoch.append(set(rows))
    assert seen_by_epoch[0] != seen_by_epoch[1], "the skipped tail should differ between epochs"
    loaders[0].set_epoch(0)
    again = BatchLoader(_log(1000), SCHEMA.categorical, 64, 0, 2, shuffle=True, seed=1)
    assert _row_ids(loaders[0]) == _row_ids(again), "the same seed and epoch must give the same order"


def test_evaluation_pads_the_tail_and_covers_every_row_once():
    loaders = [
        BatchLoader(_log(1000), SCHEMA.categorical, 64, rank, 2, shuffle=False, pad_tail=True) for rank in (0, 1)
    ]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 8
    assert sorted(_row_ids(batches[0]) + _row_ids(batches[1])) == list(range(1000))
    padding = sum(int((b.row_weight == 0).sum()) for bs in batches for b in bs)
    assert padding == 8 * 128 - 1000
    last = batches[1][-1]
    assert not last.label_mask("click")[last.row_weight == 0].any(), "padding rows must belong to no task"


def test_batch_holds_one_id_per_feature_in_key_order():
    batch = next(iter(BatchLoader(_log(10), SCHEMA.categorical, 4, shuffle=False)))
    kjt = batch.sparse_features
    assert kjt.keys() == SCHEMA.categorical
    assert torch.equal(kjt["C3"].values(), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(kjt.lengths(), torch.ones(32, dtype=torch.int32))


def _shards(sizes):
    """Consecutive row ids split into shards of the given sizes."""
    log, start, shards = _log(sum(sizes)), 0, []
    for size in sizes:
        shards.append(log.take(np.arange(start, start + size)))
        start += size
    return shards


@pytest.mark.parametrize("window_rows", [1, 300, 1 << 20])
def test_shuffled_windows_cover_each_row_at_most_once_with_equal_batches_per_rank(window_rows):
    shards = _shards([100, 7, 250, 1, 400, 242])  # 1,000 rows in uneven shards
    loaders = [
        BatchLoader(shards, SCHEMA.categorical, 64, rank, 2, shuffle=True, seed=5, window_rows=window_rows)
        for rank in (0, 1)
    ]
    orders = []
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == 7
        rows = _row_ids(batches[0]) + _row_ids(batches[1])
        assert len(rows) == len(set(rows)) == 7 * 128
        orders.append(rows)
    assert orders[0] != orders[1]
    again = BatchLoader(shards, SCHEMA.categorical, 64, 0, 2, shuffle=True, seed=5, window_rows=window_rows)
    again.set_epoch(1)
    assert _row_ids(again) == orders[1][: 7 * 64], "the same seed and epoch give the same order"


def test_evaluation_over_many_shards_keeps_file_order_and_pads_only_the_end():
    shards = _shards([100, 7, 250, 1, 400, 242])
    loaders = [
        BatchLoader(shards, SCHEMA.categorical, 64, rank, 2, shuffle=False, pad_tail=True, window_rows=128)
        for rank in (0, 1)
    ]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 8
    interleaved = [row for pair in zip(*batches) for batch in pair for row in _row_ids([batch])]
    assert interleaved == list(range(1000))


CRITEO = REAL_DATA / "criteo-kaggle-sample"
needs_real_data = pytest.mark.skipif(
    not REAL_DATA.exists(),
    reason=f"real data not present at {REAL_DATA} (it lives beside the checkout, ../shared/data)",
)


@needs_real_data
def test_real_criteo_kaggle_sample_has_no_rejected_row(tmp_path):
    schema = DatasetSchema.from_yaml("configs/datasets/criteo_kaggle.yaml")
    path = CRITEO / "criteo_kaggle_union_6435.tsv"
    summary = preprocess(schema, {"train": [path]}, tmp_path / "o", test_fraction=0.2, progress=False)
    assert summary.rows_read == 6435 and summary.rows_rejected == 0 and summary.padded == 0
    log = ShardedLog.open(tmp_path / "o")
    assert log.rows("train") + log.rows("test") == 6435
    assert 0.2 < log.label_mean("train", "click") < 0.3  # the sample's CTR is 0.234
    dense = np.concatenate([s.dense for s in log.split("train")])
    assert np.isfinite(dense).all() and (dense >= 0).all(), "log(1 + max(x, 0)) is never negative"


@needs_real_data
def test_real_criteo_file_with_stripped_trailing_fields_is_padded_or_rejected_as_the_schema_says(tmp_path):
    path = CRITEO / "pytorchfm_fork_train_head999.txt"
    padded = preprocess(
        DatasetSchema.from_yaml("configs/datasets/criteo_kaggle.yaml"),
        {"train": [path]},
        tmp_path / "a",
        progress=False,
    )
    assert padded.rows_read == 1000 and padded.total_written == 1000 and padded.padded == 498
    strict = DatasetSchema.from_dict(
        {**yaml.safe_load(open("configs/datasets/criteo_kaggle.yaml")), "pad_short_rows": False}
    )
    rejected = preprocess(strict, {"train": [path]}, tmp_path / "b", max_bad_fraction=1.0, progress=False)
    assert rejected.total_written == 502 and rejected.rejected == {"too few fields": 498}


@needs_real_data
@pytest.mark.parametrize(
    "schema_name, folder, train, test, labels",
    [
        ("ali_ccp", "ali-ccp-sample", ["torchrechub_ali_ccp_train_sample.csv", "torchrechub_ali_ccp_val_sample.csv"],
         ["torchrechub_ali_ccp_test_sample.csv"], ("click", "purchase")),
        ("aliexpress", "aliexpress-sample", ["torchrechub_aliexpress_train_sample.csv", "fuxictr_tiny_mtl_train.csv"],
         ["torchrechub_aliexpress_test_sample.csv", "fuxictr_tiny_mtl_test.csv"], ("click", "conversion")),
    ],
)  # fmt: skip
def test_real_ali_ccp_and_aliexpress_samples_load_through_their_schemas(
    tmp_path, schema_name, folder, train, test, labels
):
    schema = DatasetSchema.from_yaml(f"configs/datasets/{schema_name}.yaml")
    files = {"train": [REAL_DATA / folder / f for f in train], "test": [REAL_DATA / folder / f for f in test]}
    summary = preprocess(schema, files, tmp_path / "o", progress=False)
    expected_rows = sum(sum(1 for _ in open(f)) - 1 for split in files.values() for f in split)  # minus headers
    assert summary.rows_read == expected_rows and summary.rows_rejected == 0
    log = ShardedLog.open(tmp_path / "o")
    assert tuple(log.label_kinds) == labels
    batch = next(iter(BatchLoader(log.split("train"), log.categorical_features, 32, shuffle=False)))
    assert batch.sparse_features.keys() == schema.categorical and set(batch.labels) == set(labels)
    batch_labels = batch.labels
    conversion = batch_labels[labels[1]]
    assert bool((conversion <= batch_labels["click"]).all()), "conversion only on clicked rows"


def test_item_id_dropout_zeroes_a_seeded_share_of_training_ids_whatever_the_world_size():
    log = _log(8192)
    log.sparse[:] += 1  # no row 0 before dropout

    def item_ids(rank, world_size, batch_size, seed=3):
        loader = BatchLoader(
            log, SCHEMA.categorical, batch_size, rank, world_size, shuffle=True, seed=seed, id_dropout={"C2": 0.25}
        )
        return [
            (b.dense_features[:, 0], b.sparse_features["C2"].values(), b.sparse_features["C1"].values()) for b in loader
        ]

    alone = item_ids(0, 1, 256)
    dropped = torch.cat([c2 for _, c2, _ in alone]) == 0
    assert 0.22 < dropped.float().mean() < 0.28, "about p of the item IDs become row 0"
    assert all((c1 > 0).all() for _, _, c1 in alone), "other features keep their IDs"
    # two ranks of half the batch see the same rows with the same IDs dropped
    ranks = [item_ids(r, 2, 128) for r in (0, 1)]
    for whole, first, second in zip(alone, *ranks):
        assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
        assert torch.equal(whole[1], torch.cat([first[1], second[1]]))
    assert not torch.equal(dropped, torch.cat([c2 for _, c2, _ in item_ids(0, 1, 256, seed=4)]) == 0)
    evaluation = BatchLoader(log, SCHEMA.categorical, 256, shuffle=False, pad_tail=True, id_dropout={"C2": 0.25})
    assert all((b.sparse_features["C2"].values() > 0).all() for b in evaluation), "unshuffled batches keep every ID"


def test_an_epoch_started_at_a_batch_yields_what_the_whole_epoch_yields_from_there():
    """Resuming mid-epoch: the skipped batches are not built, but their shuffles and ID-dropout draws are made."""
    shards = _shards([100, 7, 250, 1, 400, 242])
    make = lambda: BatchLoader(shards, SCHEMA.categorical, 64, 1, 2, shuffle=True, seed=5, window_rows=128,  # noqa: E731
                               id_dropout={"C2": 0.5})  # fmt: skip
    whole = make()
    whole.set_epoch(1)
    expected = list(whole)[3:]
    resumed = make()
    resumed.set_epoch(1, start_batch=3)
    got = list(resumed)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())  # dropped IDs included
    with pytest.raises(ValueError, match="start_batch: 8; allowed: 0 to 7"):
        resumed.set_epoch(0, start_batch=8)
