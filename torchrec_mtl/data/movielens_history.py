"""Rating histories of the MovieLens conversion (torchrec_mtl.data.movielens): counts of earlier events, negatives
drawn among the movies a user never rated, and the per-user temporal split.

Plain numpy over arrays of userId, movieId and timestamp; an event's key is ``owner << 32 | time`` or
``user << 32 | movie`` (ids and seconds fit in 32 bits), so one sorted int64 array answers each lookup.

Example::

    >>> keys = np.sort(np.array([1 << 32 | 10, 1 << 32 | 20, 2 << 32 | 5]))
    >>> count_before(keys, np.array([1, 1, 2]), np.array([15, 20, 99]))
    array([1, 1, 1])
"""

from __future__ import annotations

import numpy as np

MIN_RATINGS_FOR_TEST = 5  # per_user split: users with fewer ratings stay wholly in train
_MAX_ROUNDS = 10_000


def count_before(keys_sorted: np.ndarray, owner: np.ndarray, before: np.ndarray) -> np.ndarray:
    """For each query, the number of events of ``owner`` with time strictly before ``before``.

    ``keys_sorted`` holds ``owner << 32 | time`` of every event, sorted."""
    start = np.searchsorted(keys_sorted, owner << 32, side="left")
    return np.searchsorted(keys_sorted, (owner << 32) | before, side="left") - start


def sample_negatives(
    user: np.ndarray,
    max_year: np.ndarray,
    rated_keys: np.ndarray,
    movie_ids: np.ndarray,
    movie_year: np.ndarray,
    popularity: np.ndarray,
    k: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """[n, k] movieIds: never rated by the row's user, ``movie_year`` at most ``max_year``, no repeats in a row.

    Rejection sampling over all still-unfilled slots at once; returns the draws and the number of rounds."""
    n = user.size
    chosen = np.zeros((n, k), dtype=np.int64)
    pending = np.ones((n, k), dtype=bool)
    p = popularity / popularity.sum()
    rounds = 0
    while pending.any():
        rounds += 1
        if rounds > _MAX_ROUNDS:
            raise RuntimeError(
                f"negative sampling: {int(pending.sum())} slots still unfilled after {_MAX_ROUNDS} rounds"
            )
        rows, cols = np.nonzero(pending)
        draw = rng.choice(movie_ids.size, size=rows.size, p=p)
        movie = movie_ids[draw]
        key = (user[rows] << 32) | movie
        at = np.minimum(np.searchsorted(rated_keys, key), rated_keys.size - 1)
        bad = (rated_keys[at] == key) | (movie_year[draw] > max_year[rows])
        chosen[rows, cols] = movie
        pending[rows, cols] = bad
        # a repeat within a row: the later slot draws again (only rows touched this round can hold a new repeat)
        touched = np.unique(rows)
        block, open_ = chosen[touched], pending[touched]
        for j in range(1, k):
            earlier = (block[:, :j] == block[:, j : j + 1]) & ~open_[:, :j]
            open_[:, j] |= earlier.any(axis=1)
        pending[touched] = open_
    return chosen, rounds


def per_user_test(user: np.ndarray, movie: np.ndarray, ts: np.ndarray, test_fraction: float) -> np.ndarray:
    """Boolean per rating: among the user's last ``ceil(test_fraction * n_user)`` in (timestamp, movieId) order.

    None for users with fewer than :data:`MIN_RATINGS_FOR_TEST` ratings, at most ``n_user - 1`` otherwise."""
    order = np.lexsort((movie, ts, user))
    _, start, count = np.unique(user[order], return_index=True, return_counts=True)
    n_test = np.ceil(np.round(test_fraction * count, 9)).astype(np.int64)
    n_test = np.where(count >= MIN_RATINGS_FOR_TEST, np.minimum(np.maximum(n_test, 1), count - 1), 0)
    rank = np.arange(user.size) - np.repeat(start, count)  # position within the user's ordered ratings
    is_test = np.empty(user.size, dtype=bool)
    is_test[order] = rank >= np.repeat(count - n_test, count)
    return is_test


def rating_histories(
    user: np.ndarray,
    ts: np.ndarray,
    movie: np.ndarray,
    genre1: np.ndarray,
    counted: np.ndarray,
    length: int,
    repeat: int = 1,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each rating's history as two aligned ``|``-separated fields: the movieIds, and their ``genre1``.

    One query per rating (``user``, ``ts``, in the order given); the events are the ratings where ``counted`` holds
    (torchrec_mtl.data.movielens counts every rating): the user's such ratings strictly before ``ts``, oldest first
    (same-second ones by movieId), the last ``length``. Each field is repeated ``repeat`` times in a row (a positive
    and its negatives share one history). Returns the two object arrays and ``(start, end, available)`` per rating
    (torchrec_mtl.data.histories.history_stats)."""
    from torchrec_mtl.data.histories import history_bounds, join_histories

    order, start, end, available = history_bounds(
        user[counted], ts[counted], user, ts, length, tiebreak=movie[counted]
    )
    fields = []
    for values in (movie, genre1):
        tokens = values[counted].astype(np.int64).astype(str)[order]
        fields.append(np.repeat(np.array(join_histories(tokens, start, end, "|"), dtype=object), repeat))
    return fields[0], fields[1], (start, end, available)
