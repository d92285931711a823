"""Reading, encoding and batching: the rules that decide which rows reach which rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REAL_DATA
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.logs import CategoricalVocabulary, EncodedLog, LogFormatError, encode, read_log
from torchrec_mtl.schema import DatasetSchema, SchemaError

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


def test_encoding_rules(tmp_path):
    path = tmp_path / "log.tsv"
    ints = ["", "-5", "0", "9"] + ["1"] * 9
    cats = ["aa", "bb", "", "cc", "dd", "ee", "ff", "aa"]
    rows = [["1", "0", "4.5", *ints, *cats], ["0", "0", "", *ints, *(["aa"] * 8)]]
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    frame = read_log(path, SCHEMA)
    vocabulary = CategoricalVocabulary.fit(frame, SCHEMA, min_count=2)
    encoded = encode(frame, SCHEMA, vocabulary)
    np.testing.assert_allclose(encoded.dense[0, :4], [0.0, 0.0, 0.0, np.log(10.0)], rtol=1e-6)
    # "aa" appears in C1 twice (kept), "bb" once (rare -> 0), the empty C3 is missing (-> 0)
    assert encoded.sparse[0, 0] == 1 and encoded.sparse[0, 1] == 0 and encoded.sparse[0, 2] == 0
    assert np.isnan(encoded.labels["rating"][1]) and encoded.labels["rating"][0] == 4.5


def test_log_with_wrong_column_count_names_the_file(tmp_path):
    path = tmp_path / "short.tsv"
    path.write_text("1\t0\t\t1\t2\n")
    with pytest.raises(LogFormatError, match="short.tsv"):
        read_log(path, SCHEMA)


def test_schema_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlabels: {click: binary}\ninteger: []\ncategorical: [C1]\nitem_id: C9\n")
    with pytest.raises(SchemaError, match=r"bad.yaml: item_id: 'C9'"):
        DatasetSchema.from_yaml(path)
    path.write_text("name: x\nlabels: {click: ordinal}\ninteger: []\ncategorical: []\n")
    with pytest.raises(SchemaError, match=r"labels.click"):
        DatasetSchema.from_yaml(path)


CRITEO_SAMPLE = REAL_DATA / "criteo-kaggle-sample" / "criteo_kaggle_union_6435.tsv"


@pytest.mark.skipif(
    not CRITEO_SAMPLE.exists(),
    reason=f"real data not present at {CRITEO_SAMPLE} (it lives beside the checkout, ../shared/data)",
)
def test_real_criteo_kaggle_sample_reads_and_encodes_under_the_shipped_schema():
    schema = DatasetSchema.from_yaml("configs/datasets/criteo_kaggle.yaml")
    frame = read_log(CRITEO_SAMPLE, schema)
    assert frame.height == sum(1 for _ in CRITEO_SAMPLE.open()) == 6435
    assert set(frame["click"].unique().to_list()) == {0.0, 1.0}
    encoded = encode(frame, schema, CategoricalVocabulary.fit(frame, schema, min_count=1))
    assert encoded.sparse.shape == (6435, 26) and np.isfinite(encoded.dense).all()
    assert (encoded.dense >= 0).all(), "log(1 + max(x, 0)) is never negative"
