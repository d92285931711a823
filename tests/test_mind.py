"""MIND impressions into a click log with news text: every shown item is a row, impressions split by time."""

from __future__ import annotations

import polars as pl
import pytest

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
