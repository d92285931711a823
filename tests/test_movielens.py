"""MovieLens -> multi-task log: every rating a positive, unrated negatives, a per-user time split (each user's last
ratings in test, every test user in train) with cold movies, features from past training ratings only, an items file
for every movie, a schema that reads it all, repeatable draws; the global time split still works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import REAL_DATA
from torchrec_mtl.data.movielens import COLUMNS, MIN_RATINGS_FOR_TEST, convert_movielens
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
    summary = convert_movielens(MOVIELENS, out, negatives_per_positive=K, test_fraction=0.2, seed=0, split="per_user")
    return out, summary, _log(out / "train.tsv"), _log(out / "test.tsv")


@pytest.fixture(scope="module")
def converted_global(tmp_path_factory):
    out = tmp_path_factory.mktemp("movielens_global")
    summary = convert_movielens(MOVIELENS, out, negatives_per_positive=K, test_fraction=0.2, seed=0, split="global")
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


def test_per_user_split_puts_each_users_last_ratings_in_test(converted, ratings):
    _, summary, train, test = converted
    assert summary["split"] == summary["parameters"]["split"] == "per_user" and summary["cut_timestamp"] is None
    assert train["timestamp"].is_sorted() and test["timestamp"].is_sorted()
    assert summary["rows"] == {**summary["rows"], "train": train.height, "test": test.height}
    positives = _both(converted).filter(pl.col("click") == 1)
    # order key (timestamp, movieId): movieIds are < 2**20
    key = pl.col("timestamp") * (1 << 20) + pl.col("item")
    per_user = positives.group_by("user").agg(
        n=pl.len(),
        n_test=(pl.col("split") == "test").sum(),
        last_train=key.filter(pl.col("split") == "train").max(),
        first_test=key.filter(pl.col("split") == "test").min(),
        last_train_time=pl.col("timestamp").filter(pl.col("split") == "train").max(),
        first_test_time=pl.col("timestamp").filter(pl.col("split") == "test").min(),
    )
    # the rule: ceil(0.2 n) = ceil(n / 5) for users with >= 5 ratings, at most n - 1; none otherwise
    expected = [min(-(-n // 5), n - 1) if n >= MIN_RATINGS_FOR_TEST else 0 for n in per_user["n"]]
    assert per_user["n_test"].to_list() == expected
    tested = per_user.filter(pl.col("n_test") > 0)
    assert tested.height == per_user.height == ratings["userId"].n_unique()  # latest-small: >= 20 ratings per user
    # every test user has training rows, all before (or tied and lower movieId than) the user's test ratings
    assert tested["last_train"].is_not_null().all()
    assert (tested["last_train"] < tested["first_test"]).all()
    assert (tested["last_train_time"] <= tested["first_test_time"]).all()
    assert set(test["user"].unique().to_list()) <= set(train["user"].unique().to_list())
    assert summary["users_only_in_test"] == 0 and summary["test_users"] == summary["train_users"] == per_user.height
    share = summary["rows"]["test_positives"] / summary["rows"]["positives"]
    assert share == pytest.approx(positives.filter(pl.col("split") == "test").height / positives.height)
    assert 0.2 <= share < 0.21


def _expected_counts(sample: pl.DataFrame, events: pl.DataFrame, before: pl.Expr) -> dict[str, pl.Series]:
    """For each sample row, the events (user/item, rated_at) of its user and of its item strictly before ``before``."""
    counts = {}
    for feature, column in (("user_prior_ratings", "user"), ("item_prior_ratings", "item")):
        expected = (
            sample.select("row", column, before=before)
            .join(events.select(column, "rated_at"), on=column, how="left")
            .group_by("row")
            .agg((pl.col("rated_at") < pl.col("before")).sum().alias("expected"))
        )
        counts[feature] = sample.join(expected, on="row", how="left").sort("row")["expected"]
    return counts


def test_count_features_see_only_training_ratings_before_the_row(converted):
    rows = _both(converted).with_row_index("row")
    train_ratings = rows.filter((pl.col("split") == "train") & (pl.col("click") == 1)).select(
        "user", "item", rated_at="timestamp"
    )
    # every 997th row, and every 97th test row (test rows count everybody's training ratings before their time)
    sample = pl.concat([rows.gather_every(997), rows.filter(pl.col("split") == "test").gather_every(97)]).unique(
        "row", maintain_order=True
    )
    sample = sample.sort("row")
    for feature, expected in _expected_counts(sample, train_ratings, pl.col("timestamp")).items():
        assert (sample[feature] == expected).all(), feature
    test_sample = sample.filter(pl.col("split") == "test")
    assert test_sample.height > 100 and (test_sample["user_prior_ratings"] > 0).all()
    assert (sample["hour"] == (sample["timestamp"] // 3600) % 24).all()


def test_cold_movies_appear_in_test_only(converted):
    _, summary, train, test = converted
    cold = set(test["item"].unique().to_list()) - set(train["item"].unique().to_list())
    assert summary["cold_items"] == len(cold) > 0
    assert not train["item"].is_in(sorted(cold)).any()
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


def test_global_split_cuts_all_users_at_one_time(converted, converted_global, ratings):
    _, summary, train, test = converted_global
    assert summary["split"] == "global"
    cut = summary["cut_timestamp"]
    assert train["timestamp"].max() < cut <= test["timestamp"].min()
    assert train["timestamp"].is_sorted() and test["timestamp"].is_sorted()
    share = summary["rows"]["test_positives"] / summary["rows"]["positives"]
    assert abs(share - 0.2) < 0.01
    assert summary["rows"] == {**summary["rows"], "train": train.height, "test": test.height}
    only_test = set(test["user"].unique().to_list()) - set(train["user"].unique().to_list())
    assert summary["users_only_in_test"] == len(only_test) > 0  # the new-user cold start the per-user split avoids
    # counts frozen at the cut: all ratings strictly before min(row time, cut)
    sample = _both(converted_global).with_row_index("row").gather_every(997)
    events = ratings.select(user="userId", item="movieId", rated_at="timestamp")
    before = pl.min_horizontal("timestamp", pl.lit(cut))
    for feature, expected in _expected_counts(sample, events, before).items():
        assert (sample[feature] == expected).all(), feature
    # the negatives do not depend on the split: same rows, other assignment to train/test
    fixed = ["click", "conversion", "rating", "user", "item", "timestamp"]
    assert _both(converted_global).select(fixed).sort(fixed).equals(_both(converted).select(fixed).sort(fixed))
    with pytest.raises(ValueError, match="split"):
        convert_movielens(MOVIELENS, "/nonexistent", split="random")
