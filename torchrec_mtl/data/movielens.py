"""MovieLens (ml-latest-small) as the multi-task impression log the job trains on (configs/datasets/movielens.yaml).

MovieLens only records what users rated, so impressions are built:

- Positives: every rating is a clicked impression at its timestamp: ``click = 1``, ``rating`` = the stars (0.5-5),
  ``conversion = 1`` if the rating is at least 4 (a "liked" watch), else 0.
- Negatives: for each positive, ``negatives_per_positive`` movies the user never rated (at any time), shown at the same
  timestamp: ``click = 0``, ``conversion = 0``, ``rating`` empty (outside the rating task). Movies are drawn in
  proportion to their number of ratings over the whole file (popularity sampling: harder negatives than uniform ones,
  which would be mostly obscure titles that a model separates by popularity alone), without repeats among one
  positive's negatives, and never a movie released after the year following the impression (a 2015 film shown in 1996
  would teach "future movie -> no click"; the year after is allowed because a few ratings precede the title's year by
  one; an undated title counts as released in the year of its first rating). Never-rated movies are never drawn.
  Draws are vectorised rejection sampling with ``numpy`` seeded by ``seed``.
- Split by time, ``split="per_user"`` (the default; the standard leave-last-out temporal protocol): each user's
  ratings are ordered by (timestamp, movieId) and the user's last ``ceil(test_fraction * n_user)`` ratings go to
  ``test.tsv`` with their negatives, the rest to ``train.tsv``. Users with fewer than :data:`MIN_RATINGS_FOR_TEST` (5)
  ratings stay wholly in train; the number is at most ``n_user - 1``, so every test user also has training rows (the
  product ``test_fraction * n_user`` is rounded to 9 decimals before the ceiling, so ``0.2 * 15`` gives 3, not 4). So
  a user's training ratings never come after the user's test ratings (same-second ties go by movieId), while other
  users' training ratings may be later than a test row: the split measures ranking for known users over time, not
  new-user cold start. Movies whose ratings all fall in test (and that are not drawn as a negative in any training
  row) appear only in the test split: the cold items of the summary.
- ``split="global"``: one cut at the ``1 - test_fraction`` quantile of the positives' timestamps; rows at or after it
  go to ``test.tsv``, earlier rows to ``train.tsv``. MovieLens users rate in bursts, so most test rows then belong to
  users with no training rows at all (on latest-small 88 such users make about 90% of the test rows: new-user cold
  start); kept for comparison.
- Both files are in time order, each positive followed by its negatives. The negatives do not depend on the split:
  the same seed draws the same negatives for either split.

Columns (tab-separated, no header, in :data:`COLUMNS` order; empty = missing):

- labels ``click``, ``conversion``, ``rating`` (empty on negatives).
- integer features: ``user_prior_ratings`` (the user's earlier ratings) and ``item_prior_ratings`` (the movie's
  earlier ratings) count only TRAINING-split ratings with a timestamp strictly before the row's (a row never sees its
  own label, any rating in the same second, or any test rating; for a test row: everybody's training ratings before
  its time, so the user's own count is the user's training ratings before that time; under the global split this is
  the same as counts frozen at the cut, as a model trained at the cut would see them),
  ``release_year`` (from the title's trailing ``(YYYY)``, empty if absent), ``item_age`` (the impression's year minus
  the release year, at least 0, empty if no year) and ``hour`` (hour of day, UTC).
- categorical features as decimal ids: ``user`` (userId), ``item`` (movieId, the ``item_id`` of items.tsv), ``genre1``
  (the first listed genre as a 1-based index into the sorted genre names of :data:`GENRES`; empty for "(no genres
  listed)"; MovieLens lists genres alphabetically, so this is the alphabetically first) and ``year_bucket`` (the
  release decade, e.g. 1990; empty if no year).
- ``timestamp`` (seconds since the epoch), kept for analysis and ignored by the schema.
- list columns (``|``-separated decimal ids; ignored by ``movielens.yaml``, read as lists by
  ``movielens_history.yaml``):
  ``hist_item``, the movieIds the user rated before the row, and aligned with it ``hist_genre1``, their ``genre1``
  (``0`` for a movie with no genre listed: a list element cannot be empty). Every rating of the user strictly before
  the row's timestamp, of either split (never the row's own rating or one in the same second), oldest first
  (same-second ratings by movieId), at most the last ``history_length`` (50): what a server sees when it scores the
  row. Unlike the integer features, a test row's history goes on past the user's last training rating, up to the
  row (an earlier test rating is an event, not the row's label: a test row's history holds no label of that row,
  and the rows that are scored at a time see only what came before it). The
  negatives shown with a rating share its user and time, hence its history; a negative's movie is never in it (the
  user never rated it), and neither is a positive's own (one rating per user and movie, at the row's own time).

Other outputs: ``items.tsv`` (header ``item_id``, ``description``; every movie of movies.csv, rated or not; description
``<title>. Genres: a, b. Tags: x, y`` with the tags lowercased, deduplicated and at most 10, the most applied first;
empty parts left out; tabs and line breaks become spaces; a field holding a double quote is quoted CSV-style, so read
it with ``polars.read_csv(path, separator="\t")``) and ``meta.json`` (the summary :func:`convert_movielens` returns,
with the ``split`` used, the users in each split and ``users_only_in_test``; ``cut_timestamp`` is null for per_user).

Example::

    >>> summary = convert_movielens("../shared/data/movielens-latest-small", "runs/data/movielens")  # doctest: +SKIP
    >>> summary["rows"]["train"] + summary["rows"]["test"] == 5 * 100_836  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from torchrec_mtl.data.histories import history_stats
from torchrec_mtl.data.movielens_history import (
    MIN_RATINGS_FOR_TEST,
    count_before,
    per_user_test,
    rating_histories,
    sample_negatives,
)
from torchrec_mtl.outputs import new_files

LABELS = ["click", "conversion", "rating"]
INTEGER_MEANING: dict[str, str] = {
    "user_prior_ratings": "the user's training-split ratings strictly before the row's time",
    "item_prior_ratings": "the movie's training-split ratings strictly before the row's time",
    "release_year": "release year from the title's trailing (YYYY); empty if absent",
    "item_age": "impression year minus release year, at least 0; empty if no year",
    "hour": "hour of day of the impression (UTC)",
}
CATEGORICAL_MEANING: dict[str, str] = {
    "user": "MovieLens userId",
    "item": "MovieLens movieId (item_id of items.tsv)",
    "genre1": "first listed genre, 1-based index into GENRES; empty for (no genres listed)",
    "year_bucket": "release decade (e.g. 1990); empty if no year",
}
LIST_MEANING: dict[str, str] = {
    "hist_item": "movieIds the user rated before the row (either split, strictly earlier), oldest first",
    "hist_genre1": "the genre1 of each hist_item movie, aligned (0: no genre listed)",
}
# the list columns come last, so that the columns before them are the log written before histories existed
COLUMNS = [*LABELS, *INTEGER_MEANING, *CATEGORICAL_MEANING, "timestamp", *LIST_MEANING]
HISTORY_LENGTH = 50  # the most recent ratings written per row
# what a history holds, recorded in meta.json (a log converted under the earlier training-split-only rule differs)
HISTORY_EVENTS = "every rating of the user strictly before the row"
GENRES = [
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir",
    "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
NO_GENRE = "(no genres listed)"
LIKED_RATING = 4.0
SPLITS = ("per_user", "global")
MAX_TAGS = 10


def _read(source: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    ratings = pl.read_csv(
        source / "ratings.csv",
        schema={"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
    )
    movies = pl.read_csv(source / "movies.csv", schema={"movieId": pl.Int64, "title": pl.String, "genres": pl.String})
    tags = pl.read_csv(
        source / "tags.csv",
        schema={"userId": pl.Int64, "movieId": pl.Int64, "tag": pl.String, "timestamp": pl.Int64},
    )
    return ratings, movies, tags


def _movie_table(movies: pl.DataFrame) -> pl.DataFrame:
    """movieId, title, genres list, release year, decade and first-genre id, sorted by movieId."""
    genre_id = {g: i + 1 for i, g in enumerate(GENRES)}
    listed = pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != NO_GENRE))
    table = (
        movies.with_columns(
            title=pl.col("title").str.replace_all(r"[\t\r\n]+", " ").str.strip_chars(),
            genre_list=listed,
        )
        .with_columns(
            release_year=pl.col("title").str.extract(r"\((\d{4})\)$").cast(pl.Int64),
            genre1=pl.col("genre_list").list.first().replace_strict(genre_id, default=None, return_dtype=pl.Int64),
        )
        .with_columns(year_bucket=pl.col("release_year") // 10 * 10)
        .sort("movieId")
    )
    unknown = sorted(set(table["genre_list"].explode().drop_nulls().to_list()) - set(GENRES))
    if unknown:
        raise ValueError(f"movies.csv: genres not in GENRES: {unknown}")
    return table


def _descriptions(table: pl.DataFrame, tags: pl.DataFrame) -> pl.DataFrame:
    """item_id and ``<title>. Genres: a, b. Tags: x, y`` for every movie."""
    top_tags = (
        tags.with_columns(tag=pl.col("tag").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars())
        .filter(pl.col("tag") != "")
        .group_by("movieId", "tag")
        .len()
        .sort(["movieId", "len", "tag"], descending=[False, True, False])
        .group_by("movieId", maintain_order=True)
        .agg(pl.col("tag").head(MAX_TAGS).str.join(", ").alias("tag_text"))
    )
    genres = pl.col("genre_list").list.join(", ")
    return (
        table.join(top_tags, on="movieId", how="left")
        .select(
            item_id=pl.col("movieId"),
            description=pl.concat_str(
                [
                    pl.col("title"),
                    pl.when(genres != "").then(pl.lit("Genres: ") + genres),
                    pl.lit("Tags: ") + pl.col("tag_text"),
                ],
                separator=". ",
                ignore_nulls=True,
            ).str.replace_all(r"[\t\r\n]+", " "),
        )
        .sort("item_id")
    )


def _rates(frame: pl.DataFrame) -> dict[str, float]:
    clicks = frame.filter(pl.col("click") == 1)
    return {
        "click": float(frame["click"].mean()) if frame.height else float("nan"),
        "conversion": float(frame["conversion"].mean()) if frame.height else float("nan"),
        "conversion_given_click": float(clicks["conversion"].mean()) if clicks.height else float("nan"),
        "mean_rating": float(clicks["rating"].mean()) if clicks.height else float("nan"),
    }


def convert_movielens(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    negatives_per_positive: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    split: str = "per_user",
    history_length: int = HISTORY_LENGTH,
) -> dict:
    """Write ``train.tsv``, ``test.tsv``, ``items.tsv`` and ``meta.json`` into ``out_dir``; return the summary.

    The construction (labels, negatives, split, features) is in the module docstring. The files are written beside
    and moved in at the end (``meta.json`` last); ``out_dir`` must be new, empty or an earlier output of ours
    (torchrec_mtl.outputs)."""
    with new_files(out_dir, "converted", last="meta.json") as work:
        return _write_movielens(source_dir, work, negatives_per_positive, test_fraction, seed, split, history_length)


def _write_movielens(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    negatives_per_positive: int,
    test_fraction: float,
    seed: int,
    split: str,
    history_length: int = HISTORY_LENGTH,
) -> dict:
    started = time.perf_counter()
    if negatives_per_positive < 0:
        raise ValueError(f"negatives_per_positive: must be >= 0, got {negatives_per_positive}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must lie in (0, 1), got {test_fraction}")
    if history_length < 0:
        raise ValueError(f"history_length: must be >= 0, got {history_length}")
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    source, out = Path(source_dir), Path(out_dir)
    ratings, movies, tags = _read(source)
    table = _movie_table(movies)
    missing = ratings.join(table, on="movieId", how="anti")["movieId"].unique()
    if missing.len():
        raise ValueError(f"{source}/ratings.csv: movieIds not in movies.csv: {missing.head(10).to_list()}")

    # Positives in time order (ties by user, movie: a fixed order makes the draws repeatable).
    ratings = ratings.sort("timestamp", "userId", "movieId")
    user = ratings["userId"].to_numpy().astype(np.int64)
    movie = ratings["movieId"].to_numpy().astype(np.int64)
    ts = ratings["timestamp"].to_numpy().astype(np.int64)
    stars = ratings["rating"].to_numpy()
    n, k = user.size, negatives_per_positive
    if split == "global":
        cut = int(np.quantile(ts, 1.0 - test_fraction, method="inverted_cdf"))
        test_positive_rating = ts >= cut
    else:
        cut = None
        test_positive_rating = per_user_test(user, movie, ts, test_fraction)
    year = ts.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970

    # Negatives.
    movie_ids = table["movieId"].to_numpy().astype(np.int64)
    movie_index = np.searchsorted(movie_ids, movie)
    popularity = np.bincount(movie_index, minlength=movie_ids.size).astype(np.float64)
    # the year a movie is available from: its release year, else (undated titles) the year of its first rating
    first_year = np.full(movie_ids.size, np.iinfo(np.int64).max)
    np.minimum.at(first_year, movie_index, year)
    movie_year = table["release_year"].fill_null(pl.Series(first_year)).to_numpy().astype(np.int64)
    rated_keys = np.unique((user << 32) | movie)
    rng = np.random.default_rng(seed)
    negatives, rounds = sample_negatives(user, year + 1, rated_keys, movie_ids, movie_year, popularity, k, rng)

    # All rows, [n, 1 + k] raveled: each positive followed by its negatives, so time order holds.
    row_movie = np.concatenate([movie[:, None], negatives], axis=1).ravel()
    row_user = np.repeat(user, 1 + k)
    row_ts = np.repeat(ts, 1 + k)
    row_year = np.repeat(year, 1 + k)
    positive = np.zeros((n, 1 + k), dtype=bool)
    positive[:, 0] = True
    positive = positive.ravel()

    is_test = np.repeat(test_positive_rating, 1 + k)

    # Features, from training-split ratings strictly before the row's time.
    in_train = ~test_positive_rating
    user_prior = count_before(np.sort((user[in_train] << 32) | ts[in_train]), row_user, row_ts)
    item_prior = count_before(np.sort((movie[in_train] << 32) | ts[in_train]), row_movie, row_ts)
    at = np.searchsorted(movie_ids, row_movie)
    release = table["release_year"][at]
    genre1 = table["genre1"].fill_null(0).to_numpy()[movie_index]  # of each rating's movie
    # Histories, from every rating strictly before the row's time: the integer features' training-only rule would
    # stop a test row's history at the user's last training rating, so the most recent items (what target attention
    # learns to weigh) would be missing at test though a server has them.
    hist_item, hist_genre1, history = rating_histories(
        user, ts, movie, genre1, np.ones_like(in_train), history_length, repeat=1 + k
    )
    frame = pl.DataFrame(
        {
            "click": positive.astype(np.int8),
            "conversion": (positive & (np.repeat(stars, 1 + k) >= LIKED_RATING)).astype(np.int8),
            "rating": pl.Series(np.where(positive, np.repeat(stars, 1 + k), np.nan)).fill_nan(None),
            "user_prior_ratings": user_prior,
            "item_prior_ratings": item_prior,
            "release_year": release,
            "item_age": (pl.Series(row_year) - release).clip(lower_bound=0),
            "hour": (row_ts // 3600) % 24,
            "user": row_user,
            "item": row_movie,
            "genre1": table["genre1"][at],
            "year_bucket": table["year_bucket"][at],
            "timestamp": row_ts,
            # an empty history as a null: written as an empty field (an empty string would be quoted)
            "hist_item": pl.Series([field or None for field in hist_item.tolist()], dtype=pl.String),
            "hist_genre1": pl.Series([field or None for field in hist_genre1.tolist()], dtype=pl.String),
        }
    ).select(COLUMNS)
    train, test = frame.filter(pl.Series(~is_test)), frame.filter(pl.Series(is_test))

    out.mkdir(parents=True, exist_ok=True)
    write = {"separator": "\t", "include_header": False, "null_value": ""}
    train.write_csv(out / "train.tsv", **write)
    test.write_csv(out / "test.tsv", **write)
    items = _descriptions(table, tags)
    items.write_csv(out / "items.tsv", separator="\t")

    train_items = set(np.unique(row_movie[~is_test]).tolist())
    test_movie = row_movie[is_test]
    cold = ~np.isin(test_movie, np.fromiter(train_items, dtype=np.int64, count=len(train_items)))
    test_positive = positive[is_test]
    train_users, test_users = np.unique(user[in_train]), np.unique(user[test_positive_rating])
    test_ts = ts[test_positive_rating]
    utc = lambda t: datetime.fromtimestamp(int(t), tz=UTC).isoformat()
    summary = {
        "source": str(source),
        "split": split,
        "parameters": {"negatives_per_positive": k, "test_fraction": test_fraction, "seed": seed, "split": split},
        "rows": {
            "train": train.height,
            "test": test.height,
            "positives": n,
            "negatives": n * k,
            "train_positives": int(positive[~is_test].sum()),
            "test_positives": int(test_positive.sum()),
        },
        "rates": {"train": _rates(train), "test": _rates(test)},
        "cut_timestamp": cut,
        "cut_utc": utc(cut) if cut is not None else None,
        "test_time_range_utc": [utc(test_ts.min()), utc(test_ts.max())] if test_ts.size else None,
        "users": int(np.unique(user).size),
        "train_users": int(train_users.size),
        "test_users": int(test_users.size),
        "users_only_in_test": int(np.setdiff1d(test_users, train_users).size),
        "items": int(movie_ids.size),
        "rated_items": int((popularity > 0).sum()),
        "cold_items": int(np.unique(test_movie[cold]).size),
        "cold_item_share_of_test_rows": float(cold.mean()) if cold.size else 0.0,
        "cold_item_share_of_test_positives": float(cold[test_positive].mean()) if test_positive.any() else 0.0,
        "sampling_rounds": rounds,
        "history": {
            "length": history_length,
            "events": HISTORY_EVENTS,
            "train": history_stats(*(part[~test_positive_rating] for part in history)),
            "test": history_stats(*(part[test_positive_rating] for part in history)),
        },
        "columns": {
            "labels": {
                "click": "1 = rated (every rating), 0 = sampled unrated movie",
                "conversion": f"1 = rated >= {LIKED_RATING:g}",
                "rating": "the stars, empty on negatives",
            },
            "integer": INTEGER_MEANING,
            "categorical": CATEGORICAL_MEANING,
            "ignored": {"timestamp": "seconds since the epoch (UTC)"},
            "lists": LIST_MEANING,
            "order": COLUMNS,
        },
        "genre_ids": {g: i + 1 for i, g in enumerate(GENRES)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "meta.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_text(summary: dict) -> str:
    """A few readable lines of the summary (the full one is meta.json)."""
    rows, rates = summary["rows"], summary["rates"]
    if summary["split"] == "global":
        how = f"global cut at {summary['cut_utc']} (timestamp {summary['cut_timestamp']})"
    else:
        fraction = summary["parameters"]["test_fraction"]
        how = f"per user: each user's last ceil({fraction:g} x n) ratings (users with >= {MIN_RATINGS_FOR_TEST})"
    lines = [
        (
            f"rows: train {rows['train']:,}, test {rows['test']:,} "
            f"({rows['positives']:,} positives = ratings, {rows['negatives']:,} sampled negatives)"
        ),
        (
            f"split: {how}; test positives {rows['test_positives']:,} of {rows['positives']:,} "
            f"({rows['test_positives'] / max(rows['positives'], 1):.4f})"
        ),
        (
            f"users: {summary['users']:,}, in train {summary['train_users']:,}, in test {summary['test_users']:,}, "
            f"only in test {summary['users_only_in_test']:,}"
        ),
    ]
    for split in ("train", "test"):
        r = rates[split]
        lines.append(
            f"{split}: click {r['click']:.4f}, conversion {r['conversion']:.4f}, "
            f"conversion|click {r['conversion_given_click']:.4f}, mean rating {r['mean_rating']:.3f}"
        )
    lines.append(
        f"cold items (only in test): {summary['cold_items']:,}; share of test rows "
        f"{summary['cold_item_share_of_test_rows']:.4f}, of test positives {summary['cold_item_share_of_test_positives']:.4f}"
    )
    lines.append(
        f"items {summary['items']:,} ({summary['rated_items']:,} rated), users {summary['users']:,}; "
        f"sampling rounds {summary['sampling_rounds']}; {summary['seconds']:.1f} s"
    )
    for split in ("train", "test"):
        h = summary["history"][split]
        lines.append(
            f"{split} histories (last {summary['history']['length']} ratings before the row): "
            f"empty {h['empty_share']:.4f} of positives, mean length {h['mean_length']:.1f}, "
            f"cut {h['cut_share']:.4f}"
        )
    return "\n".join(lines)
