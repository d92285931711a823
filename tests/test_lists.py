"""List columns (multi-valued categoricals): the schema's rules."""

from __future__ import annotations

import json

import pytest

from torchrec_mtl.schema import DatasetSchema, ListSpec, SchemaError

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
