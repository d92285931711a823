"""List columns (multi-valued categoricals): the schema's rules, preprocessing of hostile lists, the shards, the
loader's KeyedJaggedTensor, the tables a model builds for them, and the paths that refuse them for now."""

from __future__ import annotations

import doctest
import json

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from torchrec_mtl import embedding_tables as embedding_tables_module
from torchrec_mtl import model as model_module
from torchrec_mtl.build import build_model
from torchrec_mtl.config import ConfigError, ModelConfig, load_config
from torchrec_mtl.data import shards as shards_module
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.preprocess import REASONS, preprocess
from torchrec_mtl.data.preprocess import parse as parse_module
from torchrec_mtl.data.shards import ShardedLog, ShardError
from torchrec_mtl.embedding_tables import embedding_tables, table_of
from torchrec_mtl.inference import list_specs, sequence_features
from torchrec_mtl.model import OrderedSparseArch
from torchrec_mtl.schema import DatasetSchema, ListSpec, SchemaError
from torchrec_mtl.train.optimizers import embedding_optimizer_specs

# A small log of one label, one integer, a user, an item, a history of items sharing the item's vocabulary and
# table, and tags of their own (hashed, sum-pooled); decimal tokens.
BASE = {
    "name": "lists",
    "labels": {"click": "binary"},
    "integer": ["I1"],
    "categorical": ["user", "item", "history", "tags"],
    "categorical_format": "decimal",
    "vocabulary": {"min_count": 1},
    "feature_vocabulary": {"tags": {"hash_size": 10}},
    "user_id": "user",
    "item_id": "item",
    "lists": {
        "history": {"separator": "|", "max_length": 3, "keep": "last", "shares": "item"},
        "tags": {"separator": ",", "max_length": 2, "pooling": "sum"},
    },
}


def _schema(**changes) -> DatasetSchema:
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return DatasetSchema.from_dict(raw, source="lists.yaml")


def _with_list(column: str, **spec) -> dict:
    return {**BASE["lists"], column: {**BASE["lists"].get(column, {}), **spec}}


# --- the schema ---------------------------------------------------------------------------------------------------

REFUSED = {
    "not categorical": (dict(lists={"other": {"separator": "|", "max_length": 2}}), "lists.other: not a categorical"),
    "two-character separator": (dict(lists=_with_list("tags", separator=",,")), "lists.tags.separator"),
    "the file's separator": (dict(lists=_with_list("tags", separator="\t")), "lists.tags.separator"),
    "a digit as separator": (dict(lists=_with_list("tags", separator="7")), "lists.tags.separator"),
    "max_length 0": (dict(lists=_with_list("tags", max_length=0)), "lists.tags.max_length"),
    "max_length text": (dict(lists=_with_list("tags", max_length="5")), "lists.tags.max_length"),
    "max_length missing": (dict(lists={"tags": {"separator": ","}}), "lists.tags: missing key(s) ['max_length']"),
    "keep": (dict(lists=_with_list("tags", keep="middle")), "lists.tags.keep"),
    "pooling": (dict(lists=_with_list("tags", pooling="max")), "lists.tags.pooling"),
    "an unknown key": (dict(lists=_with_list("tags", weights=True)), "lists.tags: expected a mapping"),
    "shares an unknown column": (dict(lists=_with_list("history", shares="nope")), "lists.history.shares: 'nope'"),
    "shares itself": (dict(lists=_with_list("history", shares="history")), "lists.history.shares"),
    "shares a list": (dict(lists=_with_list("history", shares="tags")), "'tags' is a list column itself"),
    "shares another rule": (
        dict(feature_vocabulary={"item": {"hash_size": 50}, "tags": {"hash_size": 10}}),
        "lists.history.shares: 'item' maps tokens by {hash_size: 50}",
    ),
    "two poolings of one table": (
        dict(
            categorical=["user", "item", "history", "tags", "recent"],
            lists={**BASE["lists"], "recent": {"separator": "|", "max_length": 2, "shares": "item", "pooling": "sum"}},
        ),
        "lists.recent.pooling: 'sum', but 'history' shares 'item''s table too",
    ),
    "an identity column as list": (dict(item_id="history"), "item_id: 'history' is a list column"),
    "not a mapping": (dict(lists=["history"]), "lists: expected a mapping"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_list_is_refused_naming_the_file_and_key(case):
    changes, message = REFUSED[case]
    with pytest.raises(SchemaError) as error:
        _schema(**changes)
    assert str(error.value).startswith("lists.yaml: ") and message in str(error.value)


def test_list_keys_default_and_order_and_the_fingerprint_follows_them():
    schema = _schema()
    assert schema.lists["tags"] == ListSpec(separator=",", max_length=2, keep="first", pooling="sum", shares=None)
    assert schema.lists["history"].pooling == "mean"
    assert schema.list_columns == ["history", "tags"] and schema.single_id_columns == ["user", "item"]
    assert schema.vocabulary_owner("history") == "item" and schema.vocabulary_owner("tags") == "tags"
    fingerprints = {
        _schema().fingerprint(),
        _schema(lists=_with_list("history", keep="first")).fingerprint(),
        _schema(lists=_with_list("history", max_length=4)).fingerprint(),
        _schema(lists=_with_list("tags", pooling="mean")).fingerprint(),
        _schema(lists=_with_list("tags", separator=";")).fingerprint(),
    }
    assert len(fingerprints) == 5
    # a schema without lists keeps the fingerprint it had before lists existed (its shards need no new reason)
    plain = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")
    assert "lists" not in json.dumps(plain.fingerprint()) and plain.fingerprint() == "817a642a72d5e62e"


# --- preprocessing ------------------------------------------------------------------------------------------------

def _line(item: str, history: str, tags: str, user: str = "1", count: str = "3") -> str:
    """A row of the BASE layout: click, I1, user, item, history, tags."""
    return "\t".join(["1", count, user, item, history, tags])


GOOD = [  # I1 tells the rows apart (dense column 0 = log1p(I1))
    _line("100", "5|6|100", "1,2", count="0"),  # history of three, two tags
    _line("101", "", "", user="", count="1"),  # empty history and tags: empty lists, kept
    _line("102", "1|2|3|4|5", "3,4,5", count="2"),  # five items, the last three kept; three tags, the first two kept
    _line("100", "7", "9", user="2", count="3"),
]
HOSTILE = {
    "list element empty": [_line("100", "1||2", "3"), _line("100", "|1", "3"), _line("100", "1|", "3"),
                           _line("100", "1", "3,")],  # fmt: skip
    "list element not id": [
        _line("100", "1,2", "3"),  # a wrong separator makes one unparsable element
        _line("100", "1|x", "3"),
        _line("100", "1|+2", "3"),  # a sign
        _line("100", "1|-2", "3"),
        _line("100", "1| 2", "3"),
        _line("100", "1", "3|4"),  # tags are comma-separated
    ],
}


def _preprocess(tmp_path, schema: DatasetSchema, lines, **options):
    path = tmp_path / "log.tsv"
    path.write_text("".join(line + "\n" for line in lines))
    summary = preprocess(schema, {"train": [path]}, tmp_path / "out", max_bad_fraction=1.0, progress=False, **options)
    return summary, ShardedLog.open(tmp_path / "out")


def _lists(log: ShardedLog, name: str):
    (shard,) = log.split("train")
    column = shard.lists[name]
    return [column.values[i, : column.lengths[i]].tolist() for i in range(len(column))]


def test_hostile_lists_are_counted_by_reason_and_long_ones_truncated_and_counted(tmp_path):
    lines = [*GOOD[:2], *[line for bad in HOSTILE.values() for line in bad], *GOOD[2:]]
    summary, log = _preprocess(tmp_path, _schema(), lines)

    assert summary.rows_read == len(lines) == summary.total_written + summary.rows_rejected
    assert summary.rows_written == {"train": len(GOOD)}
    assert dict(summary.rejected) == {reason: len(bad) for reason, bad in HOSTILE.items()}
    assert set(summary.rejected) <= set(REASONS)
    rejects = pl.read_csv(tmp_path / "out" / "rejects.tsv", separator="\t", quote_char=None, infer_schema=False)
    assert rejects["reason"].to_list() == [reason for reason, bad in HOSTILE.items() for _ in bad]
    assert rejects["column"].to_list() == [*["history"] * 3, "tags", *["history"] * 5, "tags"]
    assert rejects["line"].cast(int).to_list() == list(range(3, 3 + 10))

    assert summary.truncated == {"history": 1, "tags": 1} and "truncated lists: history 1, tags 1" in summary.text()
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["counts"]["truncated_lists"] == {"history": 1, "tags": 1}
    assert metadata["lists"]["history"] == {"separator": "|", "max_length": 3, "keep": "last", "pooling": "mean",
                                            "shares": "item"}  # fmt: skip
    assert metadata["counts"]["rejected_by_reason"] == {reason: len(bad) for reason, bad in HOSTILE.items()}

    # the shared vocabulary counts the items and the histories' kept elements (1 and 2 were cut off)
    vocabulary = np.load(tmp_path / "out" / "vocab" / "item.npy").tolist()
    assert vocabulary == [3, 4, 5, 6, 7, 100, 101, 102] and not (tmp_path / "out" / "vocab" / "history.npy").exists()
    row = {token: i + 1 for i, token in enumerate(vocabulary)}
    assert _lists(log, "history") == [[row[5], row[6], row[100]], [], [row[3], row[4], row[5]], [row[7]]]
    assert _lists(log, "tags") == [[2, 3], [], [4, 5], [1 + 9 % 9]]  # hashed: 1 + token % (10 - 1)
    (shard,) = log.split("train")
    assert shard.sparse[:, 1].tolist() == [row[100], row[101], row[102], row[100]], "item: the same rows"
    assert log.table_sizes == {"user": 3, "item": 9, "history": 9, "tags": 10}
    assert log.single_id_features == ["user", "item"] and list(log.lists) == ["history", "tags"]


def test_hex_lists_reject_what_a_hex_categorical_rejects(tmp_path):
    schema = _schema(categorical_format="hex")
    lines = [_line("a0", "ff|a0|1b", "c"), _line("a0", "ff|zz", "c"), _line("a0", "ff|1ffffffffffffffffff", "c"),
             _line("a0", "ff||1", "c")]  # fmt: skip
    summary, log = _preprocess(tmp_path, schema, lines)
    assert dict(summary.rejected) == {"list element not hex": 2, "list element empty": 1}
    row = {t: i + 1 for i, t in enumerate(np.load(tmp_path / "out" / "vocab" / "item.npy").tolist())}
    assert _lists(log, "history") == [[row[0xFF], row[0xA0], row[0x1B]]]


@pytest.mark.parametrize("keep, expected", [("first", [1, 2, 3]), ("last", [3, 4, 5])])
def test_keep_first_or_last(tmp_path, keep, expected):
    hashed = {"item": {"hash_size": 1000}, "history": {"hash_size": 1000}, "tags": {"hash_size": 10}}
    schema = _schema(lists=_with_list("history", keep=keep), feature_vocabulary=hashed)
    summary, log = _preprocess(tmp_path, schema, [_line("7", "1|2|3|4|5", "1"), _line("7", "1|2", "1")])
    assert _lists(log, "history") == [[1 + t for t in expected], [2, 3]]  # hashed: 1 + token % 999
    assert summary.truncated["history"] == 1


def test_a_list_of_its_own_vocabulary_counts_its_own_training_tokens(tmp_path):
    schema = _schema(lists=_with_list("history", shares=None), vocabulary={"min_count": 2})
    lines = [_line("100", "5|6|6", "1"), _line("100", "5|100", "1"), _line("100", "9", "1")]
    test_lines = [_line("100", "9|9|9", "1")]  # test tokens count toward no vocabulary
    (tmp_path / "test.tsv").write_text("".join(line + "\n" for line in test_lines))
    (tmp_path / "log.tsv").write_text("".join(line + "\n" for line in lines))
    preprocess(schema, {"train": [tmp_path / "log.tsv"], "test": [tmp_path / "test.tsv"]}, tmp_path / "out",
               progress=False)  # fmt: skip
    log = ShardedLog.open(tmp_path / "out")
    assert np.load(tmp_path / "out" / "vocab" / "history.npy").tolist() == [5, 6]
    assert np.load(tmp_path / "out" / "vocab" / "item.npy").tolist() == [100]
    assert _lists(log, "history") == [[1, 2, 2], [1, 0], [0]]  # rare and unseen tokens: row 0, kept in the list
    assert log.table_sizes["history"] == 3 and log.table_sizes["item"] == 2


def test_chunk_and_shard_sizes_do_not_change_the_lists(tmp_path):
    """Many small chunks and shards give the arrays one chunk and one shard give."""
    rng = np.random.default_rng(0)
    lines = [
        _line(str(100 + i % 11), "|".join(map(str, rng.integers(0, 50, rng.integers(0, 6)))), str(i % 5), str(i % 7))
        for i in range(3000)
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, whole = _preprocess(tmp_path / "a", _schema(), lines)
    _, chunked = _preprocess(tmp_path / "b", _schema(), lines, chunk_bytes=1 << 10, shard_rows=257)
    assert len(chunked.split("train")) == 12
    for name in ("history", "tags"):
        assert [x for shard in chunked.split("train") for x in _shard_lists(shard, name)] == _lists(whole, name)


def _shard_lists(shard, name):
    column = shard.lists[name]
    return [column.values[i, : column.lengths[i]].tolist() for i in range(len(column))]


def test_the_examples_of_the_list_arrays_run():
    for module in (shards_module, parse_module):
        assert doctest.testmod(module).failed == 0


def test_shards_of_an_older_format_are_refused_with_advice(tmp_path):
    _preprocess(tmp_path, _schema(), GOOD)
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    metadata["format_version"] = 2
    (tmp_path / "out" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ShardError, match="format version 2, this code reads 3; preprocess again"):
        ShardedLog.open(tmp_path / "out")


# --- the loader ---------------------------------------------------------------------------------------------------


def test_the_batch_carries_each_list_with_its_lengths_in_feature_order(tmp_path):
    _, log = _preprocess(tmp_path, _schema(), GOOD)
    shards = log.split("train")
    features = log.categorical_features
    (batch,) = BatchLoader(shards, features, 4, shuffle=False)
    kjt = batch.sparse_features
    assert kjt.keys() == features
    lengths = kjt.length_per_key()
    assert lengths == [4, 4, 3 + 0 + 3 + 1, 2 + 0 + 2 + 1]
    jagged = kjt.to_dict()
    assert jagged["user"].lengths().tolist() == [1, 1, 1, 1]
    assert jagged["history"].lengths().tolist() == [3, 0, 3, 1]
    assert jagged["history"].values().tolist() == [v for row in _lists(log, "history") for v in row]
    assert jagged["tags"].values().tolist() == [v for row in _lists(log, "tags") for v in row]
    assert jagged["item"].values().tolist() == shards[0].sparse[:, 1].tolist()

    # another order of the keys, a padded tail and shuffled batches keep each row's list with its row
    (padded,) = BatchLoader(shards, ["tags", "user", "history", "item"], 3, shuffle=False, pad_tail=True, world_size=2)
    assert padded.sparse_features.keys() == ["tags", "user", "history", "item"]
    assert padded.sparse_features["history"].lengths().tolist() == [3, 0, 3]
    for batch in BatchLoader(shards, features, 2, shuffle=True, seed=3):
        history = batch.sparse_features["history"]
        for row, start in zip(batch.dense_features[:, 0].tolist(), history.offsets()[:-1].tolist()):
            original = [i for i in range(4) if shards[0].dense[i, 0] == row][0]
            length = int(shards[0].lists["history"].lengths[original])
            assert history.values()[start : start + length].tolist() == _lists(log, "history")[original]


def test_id_dropout_leaves_lists_alone_and_refuses_a_list(tmp_path):
    _, log = _preprocess(tmp_path, _schema(), GOOD * 50)
    shards = log.split("train")
    loader = BatchLoader(shards, log.categorical_features, 100, shuffle=True, seed=0, id_dropout={"item": 0.5})
    plain = BatchLoader(shards, log.categorical_features, 100, shuffle=True, seed=0)
    for dropped, kept in zip(loader, plain):
        assert (dropped.sparse_features["item"].values() == 0).sum() > 20
        assert torch.equal(dropped.sparse_features["history"].values(), kept.sparse_features["history"].values())
    with pytest.raises(ValueError, match="a list feature; only single-ID features are dropped"):
        BatchLoader(shards, log.categorical_features, 100, id_dropout={"history": 0.1})
    with pytest.raises(ValueError, match="lack the shards' list feature"):
        BatchLoader(shards, ["user", "item", "history"], 100)


# --- the tables and the model -------------------------------------------------------------------------------------


def test_each_feature_maps_to_one_table_and_a_shared_table_pools_as_its_lists():
    lists = _schema().lists
    assert doctest.testmod(embedding_tables_module).failed == 0
    tables = embedding_tables({"user": 4, "item": 9, "history": 9, "tags": 10}, lists)
    assert [(t.name, t.features, t.rows, t.pooling) for t in tables] == [
        ("t_user", ("user",), 4, "sum"), ("t_item", ("item", "history"), 9, "mean"), ("t_tags", ("tags",), 10, "sum"),
    ]  # fmt: skip
    assert [table_of(f, lists) for f in ("user", "item", "history", "tags")] == ["t_user", "t_item", "t_item", "t_tags"]
    with pytest.raises(ValueError, match="shares the table of 'item', which is not a feature here"):
        embedding_tables({"user": 4, "history": 9}, lists)
    with pytest.raises(ValueError, match="'history' has 8 rows, the table of 'item' it shares 9"):
        embedding_tables({"item": 9, "history": 8}, lists)
    specs = embedding_optimizer_specs(["item", "history", "tags"], "rowwise_adagrad", 0.05, {"item": ("sgd", 0.1)},
                                      lists)  # fmt: skip
    assert specs == {"t_item": ("sgd", 0.1), "t_tags": ("rowwise_adagrad", 0.05)}
    assert doctest.testmod(model_module).failed == 0


def test_a_history_element_is_its_item_embedding_and_a_list_pools_by_its_rule():
    lists = _schema().lists
    sizes = {"user": 4, "item": 9, "history": 9, "tags": 10}
    torch.manual_seed(0)
    model = build_model(ModelConfig(embedding_dim=16), 1, sizes, torch.device("cpu"), lists=lists)
    collection = model.sparse_arch.embedding_bag_collection
    assert sorted(collection.embedding_bags) == ["t_item", "t_tags", "t_user"]
    assert model.sparse_arch.sparse_feature_names == ["user", "item", "history", "tags"]
    item_table = collection.embedding_bags["t_item"].weight.detach()
    tag_table = collection.embedding_bags["t_tags"].weight.detach()
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    # two rows: (user 1, item 3, history [3], tags [2, 5]) and (user 2, item 4, history [3, 4, 8], tags [])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "history", "tags"],
        values=torch.tensor([1, 2, 3, 4, 3, 3, 4, 8, 2, 5]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 3, 2, 0], dtype=torch.int32),
    )
    pooled = model.sparse_arch(kjt).detach()  # [B, F, D] in feature order
    torch.testing.assert_close(pooled[0, 2], pooled[0, 1])  # the clicked item's embedding is the candidate's
    torch.testing.assert_close(pooled[0, 2], item_table[3])
    torch.testing.assert_close(pooled[1, 2], item_table[[3, 4, 8]].mean(dim=0))  # mean-pooled history
    torch.testing.assert_close(pooled[0, 3], tag_table[[2, 5]].sum(dim=0))  # sum-pooled tags
    torch.testing.assert_close(pooled[1, 3], torch.zeros(16))  # an empty list pools to zeros
    assert model.interaction.out_features == 16 * 5 + 10, "one pooled vector per feature, lists included"

    with pytest.raises(ValueError, match="are not the tables'"):
        OrderedSparseArch(collection, ["user", "item", "tags"])


# --- configs and the paths that refuse lists ----------------------------------------------------------------------


@pytest.fixture
def list_schema_file(tmp_path):
    path = tmp_path / "lists.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.tables={history: {optimizer: sgd}}", "list 'history' looks up the table of 'item'"),
        ("training.augmentation.feature_dropout={tags: 0.1}", "feature_dropout.tags: a list column"),
        ("model.retrieval.item_features=[history]", "the first, 'history', is the item the in-batch softmax counts"),
    ],
)
def test_configs_naming_a_list_where_only_single_ids_work_are_refused(list_schema_file, override, message):
    tasks = "{ctr: {label: click}" + (", match: {label: click, kind: retrieval}}" if "retrieval" in override else "}")
    overrides = [f"data.schema={list_schema_file}", "model.text=null", f"objective.tasks={tasks}",
                 "objective.products={}", override]  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        load_config("configs/mmoe_synthetic.yaml", overrides)


def test_the_serving_paths_read_the_lists_and_sequence_features_a_checkpoint_records():
    spec = {"separator": "|", "max_length": 3, "keep": "last", "pooling": "mean", "shares": "user"}
    inputs = {"features": ["user", "clicks", "history"], "lists": {"history": spec, "clicks": spec},
              "sequences": {"clicks": {"kind": "din", "query": "user", "max_length": 3}}}  # fmt: skip
    assert list(list_specs(inputs)) == ["clicks", "history"], "in feature order, sequence features among them"
    assert sequence_features(inputs) == ["clicks"]
    # a checkpoint from before lists, and one from before sequences
    assert list_specs({"features": ["user"]}) == {} and sequence_features({"features": ["user"]}) == []
    assert sequence_features({"features": ["user", "history"], "lists": {"history": spec}}) == []


# --- pruning by count ---------------------------------------------------------------------------------------------


def test_pruning_counts_each_tables_lookups_a_shared_list_toward_its_owners_table(tmp_path):
    from types import SimpleNamespace

    from torchrec_mtl.config import DataConfig
    from torchrec_mtl.pruning import access_counts

    # the history comes first among the categorical features: the sparse columns (user, item) are not at the
    # features' places, so counting column i as feature i would count the user's rows as the history's
    schema = _schema(categorical=["history", "user", "item", "tags"],
                     columns=["click", "I1", "user", "item", "history", "tags"])  # fmt: skip
    lines = [*GOOD, _line("101", "100|100|101", "7,7", user="2")]
    _, log = _preprocess(tmp_path, schema, lines)
    assert log.categorical_features == ["history", "user", "item", "tags"]
    assert log.single_id_features == ["user", "item"]
    data = DataConfig(schema="lists.yaml", shards=str(tmp_path / "out"))
    trained = SimpleNamespace(config=SimpleNamespace(data=data), inputs={"table_sizes": dict(log.table_sizes)})
    counts = access_counts(trained)
    assert sorted(counts) == ["item", "tags", "user"], "one count per table, keyed by its owner"
    (shard,) = log.split("train")
    sizes = log.table_sizes
    history = np.concatenate(_lists(log, "history")).astype(np.int64)
    tags = np.concatenate(_lists(log, "tags")).astype(np.int64)
    assert len(history) == 3 + 0 + 3 + 1 + 3, "the kept elements only (the last three of five), not the padding"
    expected_item = np.bincount(shard.sparse[:, 1], minlength=sizes["item"])
    expected_item += np.bincount(history, minlength=sizes["item"])
    np.testing.assert_array_equal(counts["item"], expected_item)
    np.testing.assert_array_equal(counts["user"], np.bincount(shard.sparse[:, 0], minlength=sizes["user"]))
    np.testing.assert_array_equal(counts["tags"], np.bincount(tags, minlength=sizes["tags"]))
    assert counts["item"].sum() == len(lines) + len(history) and counts["tags"].sum() == len(tags) == 2 + 0 + 2 + 1 + 2
