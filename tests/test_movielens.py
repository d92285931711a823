"""MovieLens -> multi-task log: every rating a positive, unrated negatives, a per-user time split (each user's last
ratings in test, every test user in train) with cold movies, features from past training ratings only, an items file
for every movie, a schema that reads it all, repeatable draws; the global time split still works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from conftest import REAL_DATA
from torchrec_mtl.data.movielens import COLUMNS, HISTORY_LENGTH, MIN_RATINGS_FOR_TEST, convert_movielens
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.schema import DatasetSchema

MOVIELENS = REAL_DATA / "movielens-latest-small"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "movielens.yaml"
HISTORY_SCHEMA_PATH = SCHEMA_PATH.with_name("movielens_history.yaml")
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
        schema_overrides={"rating": pl.Float64, "release_year": pl.Int64, "genre1": pl.Int64, "year_bucket": pl.Int64,
                          "hist_item": pl.String, "hist_genre1": pl.String},  # fmt: skip
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


def _tokens(field) -> list:
    return [int(t) for t in field.split("|")] if field else []


def test_each_rows_history_is_the_users_earlier_ratings_of_either_split_oldest_first_the_last_50(converted, ratings):
    rows = _both(converted).with_row_index("row")
    all_ratings = rows.filter(pl.col("click") == 1)
    genre_of = dict(zip(rows["item"].to_list(), rows["genre1"].fill_null(0).to_list()))
    by_user: dict = {}
    for user, item, ts in zip(all_ratings["user"], all_ratings["item"], all_ratings["timestamp"]):
        by_user.setdefault(user, []).append((ts, item))
    for events in by_user.values():
        events.sort()
    sample = pl.concat([rows.gather_every(499), rows.filter(pl.col("split") == "test").gather_every(53)])
    cut = test_beyond_training = 0
    for user, item, ts, hist_item, hist_genre1, split, prior in zip(
        sample["user"], sample["item"], sample["timestamp"], sample["hist_item"], sample["hist_genre1"],
        sample["split"], sample["user_prior_ratings"],
    ):  # fmt: skip
        earlier = [movie for t, movie in by_user.get(user, []) if t < ts]  # strictly before: not its own second
        expected = earlier[-HISTORY_LENGTH:]
        cut += len(earlier) > HISTORY_LENGTH
        assert _tokens(hist_item) == expected
        assert _tokens(hist_genre1) == [genre_of[m] for m in expected]  # aligned, 0 for no genre listed
        assert item not in expected
        test_beyond_training += split == "test" and len(expected) > min(prior, HISTORY_LENGTH)
    assert cut > 0 and sample.height > 1000
    # a test row's history reaches past the user's training ratings (user_prior_ratings counts those only)
    assert test_beyond_training > 0
    lengths = rows["hist_item"].fill_null("").str.split("|").list.len() - rows["hist_item"].is_null().cast(pl.UInt32)
    assert (lengths >= rows["user_prior_ratings"].clip(upper_bound=HISTORY_LENGTH)).all()
    train_rows = rows["split"] == "train"  # under the per-user split a training row's earlier ratings are all training
    train_priors = rows["user_prior_ratings"].filter(train_rows).clip(upper_bound=HISTORY_LENGTH)
    assert (lengths.filter(train_rows) == train_priors).all()
    genre_lengths = rows["hist_genre1"].fill_null("").str.split("|").list.len()
    assert (genre_lengths - rows["hist_genre1"].is_null().cast(pl.UInt32) == lengths).all()


def test_the_negatives_shown_with_a_rating_share_its_history(converted):
    _, _, train, test = converted
    for frame in (train, test):
        group = np.arange(frame.height) // (1 + K)  # each positive followed by its K negatives
        per_group = frame.with_columns(g=pl.Series(group)).group_by("g").agg(
            pl.col("hist_item").n_unique().alias("items"), pl.col("hist_genre1").n_unique().alias("genres")
        )
        assert (per_group["items"] == 1).all() and (per_group["genres"] == 1).all()


def test_the_schemas_read_the_histories_as_lists_or_ignore_them_leaving_every_other_column_as_it_was(
    converted, tmp_path
):
    out, summary, _, _ = converted
    files = {"train": [out / "train.tsv"], "test": [out / "test.tsv"]}
    lists = preprocess(DatasetSchema.from_yaml(HISTORY_SCHEMA_PATH), files, tmp_path / "lists", progress=False)
    assert lists.rows_rejected == 0 and lists.total_written == summary["rows"]["train"] + summary["rows"]["test"]
    metadata = json.loads((tmp_path / "lists" / "metadata.json").read_text())
    assert metadata["counts"]["truncated_lists"] == {"hist_item": 0, "hist_genre1": 0}  # written <= 50
    # movielens.yaml ignores them: its shards are those of the log without the two columns (on the first 40,000
    # lines of each file, for time)
    full, cut = {}, {}
    for split in ("train", "test"):
        lines = (out / f"{split}.tsv").read_text().splitlines(keepends=True)[:40_000]
        (tmp_path / f"full_{split}.tsv").write_text("".join(lines))
        (tmp_path / f"cut_{split}.tsv").write_text("".join(line.rsplit("\t", 2)[0] + "\n" for line in lines))
        full[split], cut[split] = [tmp_path / f"full_{split}.tsv"], [tmp_path / f"cut_{split}.tsv"]
    raw = yaml.safe_load(SCHEMA_PATH.read_text())
    raw["columns"] = [c for c in raw["columns"] if not c.startswith("hist_")]
    raw["ignore"] = [c for c in raw["ignore"] if not c.startswith("hist_")]
    preprocess(DatasetSchema.from_yaml(SCHEMA_PATH), full, tmp_path / "ignored", progress=False)
    preprocess(DatasetSchema.from_dict(raw), cut, tmp_path / "before", progress=False)
    arrays = sorted(p.relative_to(tmp_path / "before") for p in (tmp_path / "before").rglob("*.npy"))
    assert arrays == sorted(p.relative_to(tmp_path / "ignored") for p in (tmp_path / "ignored").rglob("*.npy"))
    assert arrays
    for path in arrays:
        before, ignored = np.load(tmp_path / "before" / path), np.load(tmp_path / "ignored" / path)
        assert np.array_equal(before, ignored, equal_nan=before.dtype.kind == "f"), path
