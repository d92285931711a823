"""Behaviour histories for list columns: for each row, the owner's (user's) earlier events, oldest first, cut to the
most recent ``length``, written as one separated field per row (the layout of a schema's ``lists``,
docs/data.md "List columns").

Plain numpy: events and queries are keyed ``owner << 32 | time`` (owners and times fit in 32 bits), so one sorted
int64 array answers every query by two binary searches.

Example::

    >>> order, start, end, _ = history_bounds(np.array([1, 1, 2]), np.array([10, 20, 5]), np.array([1, 1]),
    ...                                    np.array([20, 99]), length=5)
    >>> start.tolist(), end.tolist()  # user 1 before time 20: its event at 10; before 99: both
    ([0, 0], [1, 2])
    >>> join_histories(np.array(["a", "b", "c"])[order], start, end, "|")
    ['a', 'a|b']
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


def history_bounds(
    event_owner: np.ndarray,
    event_time: np.ndarray,
    owner: np.ndarray,
    before: np.ndarray,
    length: int,
    tiebreak: np.ndarray | None = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each query's history lies among the events: ``(order, start, end, available)``.

    ``order`` sorts the events by (owner, time, ``tiebreak``); query ``i``'s history is ``order[start[i]:end[i]]``:
    the events of ``owner[i]`` with time strictly before ``before[i]`` (never an event at the query's own time),
    oldest first, at most the last ``length`` of them; ``available[i]`` counts those events before the cut."""
    if length < 0:
        raise ValueError(f"length: must be >= 0, got {length}")
    event_owner, event_time = np.asarray(event_owner, np.int64), np.asarray(event_time, np.int64)
    owner, before = np.asarray(owner, np.int64), np.asarray(before, np.int64)
    for name, values in (("event owner", event_owner), ("event time", event_time), ("owner", owner), ("time", before)):
        if values.size and (values.min() < 0 or values.max() >= 1 << 32):
            raise ValueError(f"{name}: must lie in [0, 2**32)")
    keys = (event_owner << 32) | event_time
    order = np.lexsort((tiebreak, keys) if tiebreak is not None else (keys,))
    sorted_keys = keys[order]
    first = np.searchsorted(sorted_keys, owner << 32, side="left")
    end = np.searchsorted(sorted_keys, (owner << 32) | before, side="left")
    return order, np.maximum(first, end - length), end, end - first


def join_histories(tokens: Sequence[str] | np.ndarray, start: np.ndarray, end: np.ndarray, separator: str) -> List[str]:
    """One field per query: ``tokens[start:end]`` joined by ``separator`` (empty for an empty history). ``tokens``
    are in the events' sorted order (``tokens_in_event_order[order]``)."""
    values = list(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)
    return [separator.join(values[s:e]) for s, e in zip(start.tolist(), end.tolist())]


def history_stats(start: np.ndarray, end: np.ndarray, available: np.ndarray | None = None) -> dict:
    """Rows, the share with an empty history, the mean and largest length, and (given ``available``, each query's
    number of earlier events before the cut) the share of rows cut to the most recent events."""
    lengths = end - start
    stats = {
        "rows": int(lengths.size),
        "empty_share": float((lengths == 0).mean()) if lengths.size else 0.0,
        "mean_length": float(lengths.mean()) if lengths.size else 0.0,
        "max_length": int(lengths.max()) if lengths.size else 0,
    }
    if available is not None:
        stats["cut_share"] = float((available > lengths).mean()) if lengths.size else 0.0
    return stats
