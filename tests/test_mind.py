"""MIND impressions into a click log with news text: every shown item is a row, impressions split by time."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import yaml

from conftest import REAL_DATA
from torchrec_mtl.data.mind import convert_mind
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.schema import DatasetSchema

MIND = REAL_DATA / "mind-small-subset"
pytestmark = pytest.mark.skipif(not MIND.exists(), reason=f"real data not present at {MIND}")


def test_every_shown_news_item_is_one_row_and_the_split_follows_time(tmp_path):
    meta = convert_mind(MIND, tmp_path)
    shown = sum(
        len(line.rstrip("\n").split("\t")[4].split()) for line in open(MIND / "behaviors.tsv", encoding="utf-8")
    )
    assert meta["rows"] == shown and meta["impressions_rejected"] == {}
    train, test = (pl.read_csv(tmp_path / f"{s}.tsv", separator="\t") for s in ("train", "test"))
    assert train.height + test.height == shown
    assert set(train["impression"]).isdisjoint(set(test["impression"])), "an impression stays whole"
    items = pl.read_csv(tmp_path / "items.tsv", separator="\t", infer_schema=False)
    assert items.height == meta["news_with_text"] == 2000 and items["description"].str.len_chars().min() > 0
    with_text = (
        train["news"].is_in(items["item_id"].cast(pl.Int64)).sum()
        + test["news"].is_in(items["item_id"].cast(pl.Int64)).sum()
    )
    assert with_text == meta["shown_news_with_text"]  # the sample's caveat: few shown items have text
    summary = preprocess(
        DatasetSchema.from_yaml("configs/datasets/mind.yaml"),
        {"train": [tmp_path / "train.tsv"], "test": [tmp_path / "test.tsv"]},
        tmp_path / "shards",
        progress=False,
    )
    assert summary.rows_rejected == 0 and summary.total_written == shown


def _behaviors() -> list:
    return [line.rstrip("\n").split("\t") for line in open(MIND / "behaviors.tsv", encoding="utf-8")]


def test_each_rows_history_is_its_impressions_click_history_without_its_own_news_the_last_50(tmp_path):
    meta = convert_mind(MIND, tmp_path)
    rows = pl.concat([pl.read_csv(tmp_path / f"{s}.tsv", separator="\t", schema_overrides={
        "hist_news": pl.String, "hist_category": pl.String}) for s in ("train", "test")])  # fmt: skip
    news = pl.read_csv(MIND / "news.tsv", separator="\t", has_header=False, quote_char=None, infer_schema=False)
    names = sorted(set(news["column_1"]))
    category = {int(n[1:]): names.index(c) + 1 for n, c in zip(news["column_0"], news["column_1"])}
    history = {int(f[0]): [int(t[1:]) for t in f[3].split()] for f in _behaviors()}
    users_history: dict = {}
    for f in _behaviors():  # MIND's history is the user's, before the log: the same in each of a user's impressions
        assert users_history.setdefault(f[1], f[3]) == f[3]
    dropped = cut = 0
    for impression, own, hist_news, hist_category, length in zip(
        rows["impression"], rows["news"], rows["hist_news"], rows["hist_category"], rows["history_length"]
    ):
        past = history[impression]
        kept = [n for n in past if n != own]
        dropped += len(kept) < len(past)
        cut += len(kept) > 50
        expected = kept[-50:]
        assert ([int(t) for t in hist_news.split("|")] if hist_news else []) == expected
        categories = [int(t) for t in hist_category.split("|")] if hist_category else []
        assert categories == [category.get(n, 0) for n in expected]
        assert own not in expected and length == len(past)
    assert dropped == 479 and cut > 0  # the shared subset: 479 shown news were in the user's own history
    assert 0.0 < meta["history"]["train"]["empty_share"] < 0.05
    assert meta["history"]["train"]["with_text_share"] < 0.1  # the subset's caveat: few history news have a row


def test_the_schemas_read_the_history_as_lists_or_ignore_it_leaving_every_other_column_as_it_was(tmp_path):
    convert_mind(MIND, tmp_path / "log")
    files = {s: [tmp_path / "log" / f"{s}.tsv"] for s in ("train", "test")}
    lists = preprocess(DatasetSchema.from_yaml("configs/datasets/mind_history.yaml"), files, tmp_path / "lists",
                       progress=False)  # fmt: skip
    assert lists.rows_rejected == 0
    cut = {}
    for split in ("train", "test"):
        frame = pl.read_csv(tmp_path / "log" / f"{split}.tsv", separator="\t", infer_schema=False)
        frame.drop("hist_news", "hist_category").write_csv(tmp_path / f"cut_{split}.tsv", separator="\t")
        cut[split] = [tmp_path / f"cut_{split}.tsv"]
    raw = yaml.safe_load(open("configs/datasets/mind.yaml"))
    raw["ignore"] = ["impression"]
    preprocess(DatasetSchema.from_yaml("configs/datasets/mind.yaml"), files, tmp_path / "ignored", progress=False)
    preprocess(DatasetSchema.from_dict(raw), cut, tmp_path / "before", progress=False)
    arrays = sorted(p.relative_to(tmp_path / "before") for p in (tmp_path / "before").rglob("*.npy"))
    assert arrays
    for path in arrays:
        before, ignored = np.load(tmp_path / "before" / path), np.load(tmp_path / "ignored" / path)
        assert np.array_equal(before, ignored, equal_nan=before.dtype.kind == "f"), path
