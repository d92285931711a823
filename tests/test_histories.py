"""Behaviour histories: the builder (only earlier events, oldest first, the most recent kept), MIND's per-row rule, and
the synthetic 'history' profile (seeded, leakage-free, and its history really tells the click)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from torchrec_mtl.data import synthetic_history
from torchrec_mtl.data.histories import history_bounds, history_stats, join_histories
from torchrec_mtl.data.mind import row_history
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.data.synthetic import SyntheticConfig, draw_latents, generate
from torchrec_mtl.schema import DatasetSchema

REPO = Path(__file__).resolve().parents[1]


def _brute_force(event_owner, event_time, owner, before, length):
    """Each query's history by a plain loop: the owner's events strictly before, by (time, position), the last few."""
    histories = []
    for o, t in zip(owner, before):
        mine = [j for j in range(len(event_owner)) if event_owner[j] == o and event_time[j] < t]
        earlier = sorted((event_time[j], j) for j in mine)
        histories.append([j for _, j in earlier][max(0, len(earlier) - length) :] if length else [])
    return histories


def test_a_history_holds_only_the_owners_strictly_earlier_events_oldest_first_the_last_kept():
    rng = np.random.default_rng(0)
    event_owner, event_time = rng.integers(0, 5, 300), rng.integers(0, 50, 300)
    owner, before = rng.integers(0, 6, 200), rng.integers(0, 60, 200)  # owner 5 has no events
    for length in (0, 1, 3, 1000):
        order, start, end, available = history_bounds(
            event_owner, event_time, owner, before, length, tiebreak=np.arange(300)
        )
        expected = _brute_force(event_owner, event_time, owner, before, length)
        assert [order[s:e].tolist() for s, e in zip(start, end)] == expected
        assert (end - start <= length).all() and (available >= end - start).all()
        full = _brute_force(event_owner, event_time, owner, before, 10_000)
        assert available.tolist() == [len(h) for h in full]
    tokens = np.array([f"t{j}" for j in range(300)])[order]
    fields = join_histories(tokens, start, end, "|")
    assert fields == ["|".join(f"t{j}" for j in h) for h in expected]
    # an event at the query's own time is never in its history
    _, start, end, _ = history_bounds(np.array([1, 1]), np.array([5, 7]), np.array([1, 1]), np.array([5, 7]), 10)
    assert (end - start).tolist() == [0, 1]
    stats = history_stats(start, end, np.array([0, 3]))
    assert stats["empty_share"] == 0.5 and stats["cut_share"] == 0.5


def test_a_history_refuses_ids_or_times_outside_32_bits():
    with pytest.raises(ValueError, match="owner"):
        history_bounds(np.array([1 << 33]), np.array([0]), np.array([1]), np.array([1]), 5)
    with pytest.raises(ValueError, match="length"):
        history_bounds(np.array([1]), np.array([0]), np.array([1]), np.array([1]), -1)


def test_a_mind_row_history_drops_the_rows_own_news_and_keeps_the_most_recent():
    assert row_history([5, 7, 9, 7], [1, 2, 3, 2], own=7, length=50) == ("5|9", "1|3")
    assert row_history([5, 7, 9, 11], [1, 2, 3, 4], own=8, length=2) == ("9|11", "3|4")
    assert row_history([5, 6, 7], [1, 1, 2], own=8, length=4) == ("5|6|7", "1|1|2")  # shorter than the cut: whole
    assert row_history([7], [2], own=7, length=50) == (None, None)
    assert row_history([5, 6], [1, 1], own=8, length=0) == (None, None)


SMALL = dict(num_rows=40_000, num_users=400, num_items=300, num_brands=20, click_rate=0.1, profile="history")


def _read(folder: Path, split: str) -> pl.DataFrame:
    names = ["click", "conversion", "rating", *[f"I{k}" for k in range(1, 14)], *[f"C{k}" for k in range(1, 9)],
             "hist_item", "hist_category"]  # fmt: skip
    return pl.read_csv(folder / f"{split}.tsv", separator="\t", has_header=False, new_columns=names,
                       infer_schema=False, quote_char=None)  # fmt: skip


@pytest.fixture(scope="module")
def history_log(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("history")
    return out, generate(SyntheticConfig(**SMALL, seed=2), out)


def test_the_history_profile_is_seeded(history_log, tmp_path):
    folder, _ = history_log
    generate(SyntheticConfig(**SMALL, seed=2), tmp_path / "again")
    generate(SyntheticConfig(**SMALL, seed=3), tmp_path / "other")
    for name in ("train.tsv", "test.tsv", "meta.json"):
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (folder / "train.tsv").read_bytes() != (tmp_path / "other" / "train.tsv").read_bytes()


def test_each_rows_history_is_the_users_earlier_clicks_most_recent_last_with_their_categories(history_log):
    folder, _ = history_log
    log = pl.concat([_read(folder, "train"), _read(folder, "test")])  # time order: train rows, then test rows
    clicks: dict = {}
    truncated = 0
    for user, item, category, click, hist_item, hist_category in zip(
        log["C1"], log["C2"], log["C3"], log["click"], log["hist_item"], log["hist_category"]
    ):
        earlier = clicks.get(user, [])
        expected = earlier[-synthetic_history.HISTORY_WRITTEN :]
        truncated += len(earlier) > len(expected)
        assert (hist_item or "") == "|".join(i for i, _ in expected)  # never its own click, never a later one
        assert (hist_category or "") == "|".join(c for _, c in expected)
        if click == "1":
            clicks.setdefault(user, []).append((item, category))
    assert truncated > 0, "some users clicked more than HISTORY_WRITTEN times: the cut is exercised"


def test_the_history_tells_the_click_beyond_what_the_user_tells(history_log):
    _, meta = history_log
    rates, ceilings = meta["rates"]["history"], meta["ceilings"]
    # a candidate of the last clicked item's category is clicked far more often
    assert rates["click_last_category_match"] > 2 * rates["click_last_category_other"]
    # the recent clicks know the current interest better than the user's long-run preference does
    assert ceilings["ctr_auc_last_click"] > ceilings["ctr_auc_user_only"] + 0.01
    assert ceilings["ctr_auc_without_interest"] < ceilings["ctr_auc_user_only"] < ceilings["ctr_auc"]
    assert list(meta["columns"]["lists"]) == ["hist_item", "hist_category"]


def test_the_interest_drifts_between_sessions_and_most_shown_matches_follow_it():
    config = SyntheticConfig(**SMALL, seed=1)
    rng = np.random.default_rng(config.seed)
    latents = draw_latents(config, rng)
    user, interest = latents["user"], latents["interest"]
    changes = [np.count_nonzero(np.diff(interest[user == u])) for u in range(50)]
    assert sum(changes) > 50, "interests change within a user's rows"
    p = latents["p_click"]
    match = latents["item_category"][latents["item"]] == interest
    assert p[match].mean() > 3 * p[~match].mean()


def test_the_history_schema_reads_the_log_with_its_lists_truncated_to_20(history_log, tmp_path):
    folder, _ = history_log
    schema = DatasetSchema.from_yaml(REPO / "configs" / "datasets" / "synthetic_history.yaml")
    summary = preprocess(schema, {"train": [folder / "train.tsv"], "test": [folder / "test.tsv"]},
                         tmp_path / "shards", progress=False)  # fmt: skip
    assert summary.rows_rejected == 0 and summary.total_written == SMALL["num_rows"]
    metadata = json.loads((tmp_path / "shards" / "metadata.json").read_text())
    truncated = metadata["counts"]["truncated_lists"]
    assert truncated["hist_item"] == truncated["hist_category"] > 0
    assert metadata["table_sizes"]["hist_item"] == metadata["table_sizes"]["C2"]
