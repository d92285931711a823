"""MIND (Microsoft News Dataset) impressions as a click log with news text: a second text source for CTR.

Input: a MIND folder with ``behaviors.tsv`` (impression id, user, time, click history, impressions ``N123-1 N456-0``)
and ``news.tsv`` (news id, category, subcategory, title, abstract, ...), the MIND-small format.

Output in ``out_dir``:

- ``train.tsv`` / ``test.tsv`` (header): one row per shown news item: ``click``; integer features ``history_length``
  (news the user read before) and ``hour``; categorical ``user`` and ``news`` (the numbers of ``U123`` / ``N123``),
  ``category`` and ``subcategory`` (positions in the sorted names of news.tsv, 0 = news without a row there);
  ``impression`` (kept for grouping, ignored by the schema); then two aligned list columns (``|``-separated; ignored
  by ``mind.yaml``, read as lists by ``mind_history.yaml``): ``hist_news``, the numbers of the news in the
  impression's click history (behaviors.tsv's history column, oldest first, the last ``history_length`` (50) kept),
  and ``hist_category``, each one's category (0 for a news without a row in news.tsv). MIND's history is the user's
  clicks before the log's period, the same for every impression of a user: no click of the log (train or test) is
  ever in it. A row's own news is left out of its history (a news read before and shown again; 479 of the subset's
  189,359 shown news, 37 of them clicked), so no row's history holds its candidate. Impressions are split by time: the
  last ``test_fraction`` of them (by timestamp, then impression id) go to test, every row of an impression together.
- ``items.tsv``: ``item_id`` (the news number) and ``description`` (``title. abstract``) for every news of news.tsv.
- ``meta.json``: row counts, click rates, how many shown news have text, and the source files.

Every impression line is used or counted as rejected with its reason (too few fields, time not readable, impression
token not ``N<number>-<0|1>``, history token not ``N<number>``); the counts are in meta.json, with the histories'
lengths and how many of their news have a row in news.tsv (``history``).

Example::

    >>> summary = convert_mind("../shared/data/mind-small-subset", "runs/data/mind")  # doctest: +SKIP
    >>> summary["rows"], summary["shown_news_with_text"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Dict, List

import polars as pl

from torchrec_mtl.outputs import new_files

# the list columns come last, so that the columns before them are the log written before histories existed
COLUMNS = ["click", "history_length", "hour", "user", "news", "category", "subcategory", "impression", "hist_news",
           "hist_category"]  # fmt: skip
HISTORY_SEPARATOR = "|"
HISTORY_LENGTH = 50  # the most recent clicks written per row
_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def _news_number(token: str) -> int:
    if not token.startswith("N") or not token[1:].isdigit():
        raise ValueError(token)
    return int(token[1:])


def row_history(history: List[int], categories: List[int], own: int, length: int) -> tuple[str | None, str | None]:
    """One row's ``hist_news`` and ``hist_category`` fields: the history without the row's ``own`` news, the last
    ``length`` kept, ``|``-joined; None for an empty one (written as an empty field).

    Example::

        >>> row_history([5, 7, 9, 7], [1, 2, 3, 2], own=7, length=2)
        ('5|9', '1|3')
    """
    kept = [(n, c) for n, c in zip(history, categories) if n != own]
    kept = kept[max(0, len(kept) - length) :] if length else []
    if not kept:
        return None, None
    return HISTORY_SEPARATOR.join(str(n) for n, _ in kept), HISTORY_SEPARATOR.join(str(c) for _, c in kept)


def convert_mind(
    source: str | os.PathLike, out_dir: str | os.PathLike, test_fraction: float = 0.2,
    history_length: int = HISTORY_LENGTH,
) -> Dict:  # fmt: skip
    """Write the click log, the items file and meta.json from a MIND folder; return the meta dict. The files are
    written beside and moved in at the end (``meta.json`` last); ``out_dir`` must be new, empty or an earlier output
    of ours (torchrec_mtl.outputs)."""
    with new_files(out_dir, "converted", last="meta.json") as work:
        return _write_mind(source, work, test_fraction, history_length)


def _write_mind(
    source: str | os.PathLike, out_dir: str | os.PathLike, test_fraction: float, history_length: int = HISTORY_LENGTH
) -> Dict:
    if history_length < 0:
        raise ValueError(f"history_length: must be >= 0, got {history_length}")
    source, out = Path(source), Path(out_dir)
    for name in ("behaviors.tsv", "news.tsv"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name}: missing; expected a MIND folder (behaviors.tsv, news.tsv)")
    news = pl.read_csv(
        source / "news.tsv",
        separator="\t",
        has_header=False,
        quote_char=None,
        infer_schema=False,
        new_columns=["news_id", "category", "subcategory", "title", "abstract", "url", "title_e", "abstract_e"],
    )
    categories = {name: i + 1 for i, name in enumerate(sorted(set(news["category"].drop_nulls())))}
    subcategories = {name: i + 1 for i, name in enumerate(sorted(set(news["subcategory"].drop_nulls())))}
    news_fields = {
        _news_number(row["news_id"]): (categories.get(row["category"], 0), subcategories.get(row["subcategory"], 0))
        for row in news.iter_rows(named=True)
    }

    rejected: Counter = Counter()
    impressions: List[tuple] = []  # (time, impression id, rows)
    with open(source / "behaviors.tsv", encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 5:
                rejected["too few fields" if len(fields) < 5 else "too many fields"] += 1
                continue
            impression_id, user, time_text, history, shown = fields
            try:
                past = [_news_number(token) for token in history.split()]
            except ValueError:
                rejected["history not readable"] += 1
                continue
            past_categories = [news_fields.get(number, (0, 0))[0] for number in past]
            try:
                time = datetime.strptime(time_text, _TIME_FORMAT)
                user_number = int(user.removeprefix("U"))
                rows = []
                for token in shown.split():
                    news_token, _, label = token.rpartition("-")
                    if label not in ("0", "1"):
                        raise ValueError(token)
                    number = _news_number(news_token)
                    category, subcategory = news_fields.get(number, (0, 0))
                    own_history = row_history(past, past_categories, number, history_length)
                    rows.append((int(label), len(past), time.hour, user_number, number, category, subcategory,
                                 int(impression_id), *own_history))  # fmt: skip
            except ValueError:
                rejected["impression not readable"] += 1
                continue
            if not rows:
                rejected["no news shown"] += 1
                continue
            impressions.append((time, int(impression_id), rows))

    impressions.sort(key=lambda item: (item[0], item[1]))
    n_test = math.ceil(test_fraction * len(impressions))
    splits = {"train": impressions[: len(impressions) - n_test], "test": impressions[len(impressions) - n_test :]}
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    with_text = 0
    history: Dict = {"length": history_length}
    for split, chosen in splits.items():
        rows = [row for _, _, rows in chosen for row in rows]
        frame = pl.DataFrame(rows, schema={**dict.fromkeys(COLUMNS, pl.Int64), "hist_news": pl.String,
                                           "hist_category": pl.String}, orient="row")  # fmt: skip
        history[split] = _history_stats(frame, set(news_fields))
        frame.write_csv(out / f"{split}.tsv", separator="\t")
        with_text += int(frame["news"].is_in(list(news_fields)).sum())
        counts[split] = {"impressions": len(chosen), "rows": frame.height, "click_rate": float(frame["click"].mean())}
    pl.DataFrame(
        {
            "item_id": [str(_news_number(n)) for n in news["news_id"]],
            "description": [
                f"{title}. {abstract}" if abstract else str(title)
                for title, abstract in zip(news["title"].fill_null(""), news["abstract"].fill_null(""))
            ],
        }
    ).write_csv(out / "items.tsv", separator="\t")
    total = sum(c["rows"] for c in counts.values())
    meta = {
        "rows": total,
        "splits": counts,
        "impressions_rejected": dict(rejected),
        "shown_news_with_text": with_text,
        "shown_news_with_text_share": with_text / total if total else 0.0,
        "news_with_text": news.height,
        "history": history,
        "source": {name: str(source / name) for name in ("behaviors.tsv", "news.tsv")},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _history_stats(frame: pl.DataFrame, known: set) -> Dict:
    """Per split: the share of rows with an empty history, the mean written length, and the share of history
    tokens that are news of news.tsv (the only ones with a category)."""
    tokens = frame["hist_news"].drop_nulls().str.split(HISTORY_SEPARATOR).explode().cast(pl.Int64)
    lengths = frame["hist_news"].str.count_matches(r"\|").fill_null(-1) + 1
    return {
        "empty_share": float(frame["hist_news"].is_null().mean()) if frame.height else 0.0,
        "mean_length": float(lengths.mean()) if frame.height else 0.0,
        "with_text_share": float(tokens.is_in(list(known)).mean()) if tokens.len() else 0.0,
    }
