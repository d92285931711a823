"""MovieLens -> multi-task log: every rating a positive, unrated negatives, a time split with cold movies, features from
the past only, an items file for every movie, a schema that reads it all, repeatable draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import REAL_DATA
from torchrec_mtl.data.movielens import COLUMNS, convert_movielens
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.schema import DatasetSchema

MOVIELENS = REAL_DATA / "movielens-latest-small"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "movielens.yaml"
K = 4

pytestmark = pytest.mark.skipif(
    not (MOVIELENS / "ratings.csv").exists(),
    reason=f"MovieLens not present at {MOVIELENS} (it lives beside the checkout, ../shared/data)",
)


def _log(path: Path) -> pl.DataFrame:
    return pl.read_csv(
        path,
        separator="\t",
        has_header=False,
        new_columns=COLUMNS,
        quote_char=None,
        schema_overrides={"rating": pl.Float64, "release_year": pl.Int64, "genre1": pl.Int64, "year_bucket": pl.Int64},
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("movielens")
    summary = convert_movielens(MOVIELENS, out, negatives_per_positive=K, test_fraction=0.2, seed=0)
    return out, summary, _log(out / "train.tsv"), _log(out / "test.tsv")


@pytest.fixture(scope="module")
def ratings():
    return pl.read_csv(MOVIELENS / "ratings.csv")


def _both(converted) -> pl.DataFrame:
    _, _, train, test = converted
    return pl.concat([train.with_columns(split=pl.lit("train")), test.with_columns(split=pl.lit("test"))])


def test_every_rating_is_one_positive_with_k_unrated_negatives(converted, ratings):
    rows = _both(converted)
    positives, negatives = rows.filter(pl.col("click") == 1), rows.filter(pl.col("click") == 0)
    assert positives.height == ratings.height
    assert negatives.height == K * ratings.height
    written = positives.select(userId="user", movieId="item", rating="rating", timestamp="timestamp").sort(pl.all())
    assert written.equals(ratings.sort(pl.all()))
    assert (positives["conversion"] == (positives["rating"] >= 4).cast(pl.Int64)).all()
    assert negatives["rating"].is_null().all() and (negatives["conversion"] == 0).all()
    # never a pair the user rated, at any time
    rated = ratings.select(user="userId", item="movieId").unique()
    assert negatives.join(rated, on=["user", "item"], how="semi").height == 0
    # no repeated movie among one positive's negatives (the K rows after each positive)
    group = np.repeat(np.arange(ratings.height), K)
    assert negatives.with_columns(g=pl.Series(group)).select("g", "item").is_duplicated().sum() == 0
    # never shown before the year after the title's release year
    year = pl.from_epoch("timestamp").dt.year()
    assert negatives.filter(pl.col("release_year") > year + 1).height == 0


def test_split_is_time_ordered_at_the_cut(converted):
    _, summary, train, test = converted
    cut = summary["cut_timestamp"]
    assert train["timestamp"].max() < cut <= test["timestamp"].min()
    assert train["timestamp"].is_sorted() and test["timestamp"].is_sorted()
    share = summary["rows"]["test_positives"] / summary["rows"]["positives"]
    assert abs(share - 0.2) < 0.01
    assert summary["rows"] == {**summary["rows"], "train": train.height, "test": test.height}


def test_count_features_see_only_ratings_before_the_row_and_the_cut(converted, ratings):
    _, summary, _, _ = converted
    cut = summary["cut_timestamp"]
    sample = _both(converted).with_row_index("row").gather_every(997)
    before = pl.min_horizontal("timestamp", pl.lit(cut))
    for feature, key in (("user_prior_ratings", "userId"), ("item_prior_ratings", "movieId")):
        column = "user" if key == "userId" else "item"
        expected = (
            sample.select("row", column, before=before)
            .join(ratings.select(pl.col(key).alias(column), rated_at="timestamp"), on=column, how="left")
            .group_by("row")
            .agg((pl.col("rated_at") < pl.col("before")).sum().alias("expected"))
        )
        check = sample.join(expected, on="row")
        assert (check[feature] == check["expected"]).all(), feature
    assert (sample["hour"] == (sample["timestamp"] // 3600) % 24).all()


def test_cold_movies_appear_in_test_only(converted):
    _, summary, train, test = converted
    cold = set(test["item"].unique().to_list()) - set(train["item"].unique().to_list())
    assert summary["cold_items"] == len(cold) > 0
    share = test["item"].is_in(sorted(cold)).mean()
    assert summary["cold_item_share_of_test_rows"] == pytest.approx(share)
    assert 0 < share < 0.2


def test_items_file_describes_every_movie_by_its_item_id(converted):
    out, _, train, test = converted
    movies = pl.read_csv(MOVIELENS / "movies.csv")
    items = pl.read_csv(out / "items.tsv", separator="\t")
    assert items.columns == ["item_id", "description"]
    assert items["item_id"].sort().to_list() == movies["movieId"].sort().to_list()
    joined = items.join(movies, left_on="item_id", right_on="movieId")
    starts = [d.startswith(t.strip()) for d, t in zip(joined["description"], joined["title"])]
    assert all(starts)
    assert not joined["description"].str.contains(r"[\t\n\r]").any()
    toy_story = joined.filter(pl.col("item_id") == 1)["description"].item()
    assert toy_story.startswith("Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy")
    assert items.filter(pl.col("description").str.contains("Tags: ")).height > 0
    assert set(pl.concat([train["item"], test["item"]]).unique().to_list()) <= set(items["item_id"].to_list())


def test_schema_reads_both_files_without_a_rejected_row(converted, tmp_path):
    out, summary, _, _ = converted
    schema = DatasetSchema.from_yaml(SCHEMA_PATH)
    assert schema.columns == COLUMNS
    result = preprocess(
        schema, {"train": [out / "train.tsv"], "test": [out / "test.tsv"]}, tmp_path / "shards", progress=False
    )
    assert result.rows_rejected == 0
    assert result.rows_written == {"train": summary["rows"]["train"], "test": summary["rows"]["test"]}


def test_same_seed_same_files_and_another_seed_other_negatives(converted, tmp_path):
    out, summary, train, _ = converted
    again = convert_movielens(MOVIELENS, tmp_path / "again", negatives_per_positive=K, seed=0)
    for name in ("train.tsv", "test.tsv", "items.tsv"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}
    assert drop(again) == drop(json.loads((out / "meta.json").read_text())) == drop(summary)
    other = convert_movielens(MOVIELENS, tmp_path / "other", negatives_per_positive=K, seed=1)
    other_train = _log(tmp_path / "other" / "train.tsv")
    assert other["rows"] == summary["rows"]
    assert other_train.filter(pl.col("click") == 1).equals(train.filter(pl.col("click") == 1))
    changed = (other_train["item"] != train["item"]).mean()
    assert changed > 0.5, f"only {changed:.1%} of the rows changed with the seed"
