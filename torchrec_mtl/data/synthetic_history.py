"""The ``history`` profile of the synthetic log: each user's interest drifts from session to session, and each row
carries the user's recently clicked items, so a model that reads the history can beat one that knows only the user.

What drives the click (the log's rows are in time order: training rows, then test rows):

- **A current interest.** Each user has a few favourite categories (``USER_INTERESTS`` of them, Dirichlet weights,
  plus a little mass on every category: ``p_u``). A user's impressions fall into sessions (a new one starts with
  probability ``1 / SESSION_MEAN`` at each of the user's rows); at each new session the interest stays with
  probability ``STAY`` and is otherwise drawn again from ``p_u`` (the first session always draws). The click logit
  gains ``INTEREST_WEIGHT`` when the candidate's category (``C3``) is the current interest: the largest term.
- **What the user ID can tell** is ``p_u`` only, never which of the user's categories is current; the history tells
  it: the most recent clicks are mostly on the current (or the previous session's) interest. A small long-term taste
  per user segment and category (``LONG_TERM_STD``) is the part the ID (or ``C4``) knows exactly.
- **Shown items**: a share (``RELEVANT_SHARE``) of each user's impressions shows an item of the current interest (a
  recommender that follows it), the rest are drawn by popularity; train rows never show a cold item.
- The item's own appeal, the user's click propensity, the position, device and hour, as in the default profile.
- Conversion: half the interest match, the item's conversion appeal, the user's purchase propensity and the price;
  the rating reads the interest match and the item's appeal.

Each row's history: ``hist_item``, the ``C2`` tokens of the user's clicks on EARLIER rows (never the row's own, never
a later one), oldest first, the last ``HISTORY_WRITTEN`` of them, ``|``-separated, and aligned with it
``hist_category``, their ``C3`` tokens. Test rows come after every training row, and a test row's history holds the
user's earlier test clicks too, as a served model would see them (the labels of earlier rows, never its own).
``configs/datasets/synthetic_history.yaml`` reads them as lists sharing ``C2`` and ``C3``.

Besides the ceilings (the true probabilities), ``meta.json`` has proxies of what each kind of model can know
(``ctr_auc_user_only``: the interest term replaced by what ``p_u`` tells; ``ctr_auc_last_click``: by a match with the
last history item's category; ``ctr_auc_without_interest``: dropped) and the click rate of rows whose candidate's
category matches the last history item's against the others (``history`` in ``rates``).

Example::

    >>> from torchrec_mtl.data.synthetic import SyntheticConfig, generate
    >>> meta = generate(SyntheticConfig(profile="history", num_rows=300_000, num_users=3_000, click_rate=0.1),
    ...                 "runs/data/history")  # doctest: +SKIP
    >>> meta["ceilings"]["ctr_auc_last_click"] > meta["ceilings"]["ctr_auc_user_only"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import numpy as np

if TYPE_CHECKING:  # the generator imports this module
    from torchrec_mtl.data.synthetic import SyntheticConfig

USER_INTERESTS = 5  # favourite categories per user
SPREAD = 0.2  # of p_u spread evenly over every category
SESSION_MEAN = 30.0  # rows of a user per session, on average
STAY = 0.2  # probability that a new session keeps the interest
INTEREST_WEIGHT = 2.5  # click logit gain when the candidate's category is the current interest
LONG_TERM_STD = 0.3  # of the segment x category taste
RELEVANT_SHARE = 0.3  # of impressions showing an item of the current interest
HISTORY_WRITTEN = 30  # clicked items written per row (the schema keeps the last 20)
HISTORY_SEPARATOR = "|"
DEVICE_EFFECT = np.array([0.0, -0.3, 0.25, -0.5])


def user_preferences(num_users: int, num_categories: int, rng: np.random.Generator) -> np.ndarray:
    """[users, categories] ``p_u``: ``USER_INTERESTS`` favourites with Dirichlet weights, plus ``SPREAD`` evenly."""
    favourites = np.argsort(rng.random((num_users, num_categories)), axis=1)[:, :USER_INTERESTS]
    weights = rng.dirichlet(np.ones(USER_INTERESTS), num_users)
    p = np.full((num_users, num_categories), SPREAD / num_categories)
    np.put_along_axis(p, favourites, p[np.arange(num_users)[:, None], favourites] + (1 - SPREAD) * weights, axis=1)
    return p


def session_interests(user: np.ndarray, preference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The current interest (a category) of each row, rows in time order: sessions per user, the interest kept with
    probability ``STAY`` at a new session and drawn from the user's ``preference`` otherwise."""
    n = user.size
    order = np.argsort(user, kind="stable")  # each user's rows, in time order
    sorted_user = user[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_user[1:] != sorted_user[:-1]
    new_session = first | (rng.random(n) < 1.0 / SESSION_MEAN)
    switch = first | (new_session & (rng.random(n) >= STAY))
    at = np.nonzero(switch)[0]
    cumulative = np.cumsum(preference[sorted_user[at]], axis=1)
    drawn = (rng.random(at.size)[:, None] * cumulative[:, -1:] >= cumulative).sum(axis=1)
    drawn = np.minimum(drawn, preference.shape[1] - 1)
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(n), 0))
    interest_sorted = np.empty(n, dtype=np.int64)
    interest_sorted[at] = drawn
    interest = np.empty(n, dtype=np.int64)
    interest[order] = interest_sorted[last_switch]
    return interest


def draw_history_latents(config: "SyntheticConfig", rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """The history profile's draws up to the click labels, under the names ``synthetic.draw_latents`` returns
    (``taste`` is the interest match plus the long-term taste), plus ``interest``, ``preference`` and
    ``interest_term``."""
    from torchrec_mtl.data.synthetic import _calibrated_bias, _sigmoid, draw_impressions

    num_users, num_items, num_cat = config.num_users, config.num_items, config.num_categories

    # Items.
    item_category = rng.integers(0, num_cat, num_items)
    item_brand = rng.integers(0, config.num_brands, num_items)
    brand_click_appeal = rng.normal(0.0, 0.15, config.num_brands)
    brand_conversion_appeal = rng.normal(0.0, 0.3, config.num_brands)
    click_appeal = brand_click_appeal[item_brand] + rng.normal(0.0, 0.4, num_items)
    conversion_appeal = 0.5 * click_appeal + brand_conversion_appeal[item_brand] + rng.normal(0.0, 0.3, num_items)
    price = np.round(np.exp(rng.normal(8.0, 0.8, num_items))).astype(np.int64)
    item_age_days = rng.integers(0, 1000, num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** config.zipf_exponent
    popularity = popularity[rng.permutation(num_items)]
    cold = np.zeros(num_items, dtype=bool)
    cold[rng.choice(num_items, int(round(config.cold_item_fraction * num_items)), replace=False)] = True

    # Users.
    user_segment = rng.integers(0, config.num_segments, num_users)
    segment_taste = rng.normal(0.0, LONG_TERM_STD, (config.num_segments, num_cat))
    preference = user_preferences(num_users, num_cat, rng)
    click_propensity = rng.normal(0.0, 0.3, num_users)
    purchase_propensity = rng.normal(0.0, 0.2, num_users)
    activity = np.exp(rng.normal(0.0, 0.8, num_users))

    is_test, user, item, device, position, hour = draw_impressions(config, rng, activity, popularity, cold)
    interest = session_interests(user, preference, rng)
    # a share of the impressions shows an item of the current interest, by popularity within the category
    relevant = rng.random(config.num_rows) < RELEVANT_SHARE
    for split in (False, True):
        weight = popularity if split else np.where(cold, 0.0, popularity)
        for category in range(num_cat):
            rows = np.nonzero(relevant & (is_test == split) & (interest == category))[0]
            members = np.nonzero((item_category == category) & (weight > 0))[0]
            if rows.size and members.size:
                p = weight[members] / weight[members].sum()
                item[rows] = members[rng.choice(members.size, rows.size, p=p)]

    match = (item_category[item] == interest).astype(np.float64)
    interest_term = INTEREST_WEIGHT * match
    long_term = segment_taste[user_segment[user], item_category[item]]
    context = DEVICE_EFFECT[device] - 0.5 * np.log(position) + 0.15 * np.sin(2 * np.pi * hour / 24)
    click_logit = interest_term + long_term + click_appeal[item] + click_propensity[user] + context
    log_price = np.log(price[item]) - 8.0
    conversion_logit = 0.5 * interest_term + conversion_appeal[item] + purchase_propensity[user] - 0.8 * log_price
    train_rows = ~is_test
    p_click = _sigmoid(click_logit + _calibrated_bias(click_logit[train_rows], config.click_rate))
    p_conversion = _sigmoid(
        conversion_logit
        + _calibrated_bias(conversion_logit[train_rows], config.conversion_rate, weights=p_click[train_rows])
    )
    return {
        "item_category": item_category, "item_brand": item_brand, "brand_click_appeal": brand_click_appeal,
        "brand_conversion_appeal": brand_conversion_appeal, "click_appeal": click_appeal,
        "conversion_appeal": conversion_appeal, "price": price, "item_age_days": item_age_days,
        "popularity": popularity, "cold": cold, "user_segment": user_segment, "segment_taste": segment_taste,
        "click_propensity": click_propensity, "purchase_propensity": purchase_propensity, "activity": activity,
        "is_test": is_test, "user": user, "item": item, "device": device, "position": position, "hour": hour,
        "taste": match + long_term, "click_logit": click_logit, "conversion_logit": conversion_logit,
        "p_click": p_click, "p_conversion": p_conversion, "interest": interest, "preference": preference,
        "interest_term": interest_term,
    }  # fmt: skip


def click_histories(latents: Dict[str, np.ndarray], click: np.ndarray, length: int = HISTORY_WRITTEN):
    """Each row's ``hist_item`` and ``hist_category`` fields (C2 and C3 tokens of the user's clicks on earlier rows,
    oldest first, the last ``length``; None when empty) and the category of the last history item (-1: none)."""
    from torchrec_mtl.data.histories import history_bounds, join_histories
    from torchrec_mtl.data.synthetic import hex_id

    user, item = latents["user"], latents["item"]
    category = latents["item_category"][item]
    rows = np.arange(user.size)
    order, start, end, _ = history_bounds(user[click], rows[click], user, rows, length)
    fields = []
    for kind, values in (("item", item), ("category", category)):
        tokens = hex_id(kind, values[click])[order]
        fields.append([field or None for field in join_histories(tokens, start, end, HISTORY_SEPARATOR)])
    clicked_category = category[click][order]
    last = np.full(user.size, -1, dtype=np.int64)
    has = end > start
    last[has] = clicked_category[end[has] - 1]
    return fields[0], fields[1], last, (start, end)


def history_summary(latents: Dict[str, np.ndarray], click: np.ndarray, last: np.ndarray, bounds) -> Dict:
    """The proxies of what each kind of model can know (test AUCs of scores made of the true logit's terms) and the
    click rates by a match with the last history item's category, for ``meta.json``."""
    from torchrec_mtl.data.synthetic import binary_auc

    test = latents["is_test"]
    category = latents["item_category"][latents["item"]]
    rest = latents["click_logit"] - latents["interest_term"]
    # what the user's ID can tell about the match: the chance that the candidate's category is the current interest
    user_only = rest + INTEREST_WEIGHT * latents["preference"][latents["user"], category]
    last_click = rest + INTEREST_WEIGHT * (category == last)
    matched = category == last
    start, end = bounds
    lengths = end - start
    return {
        "ceilings": {
            "ctr_auc_without_interest": binary_auc(rest[test], click[test]),
            "ctr_auc_user_only": binary_auc(user_only[test], click[test]),
            "ctr_auc_last_click": binary_auc(last_click[test], click[test]),
        },
        "rates": {
            "click_last_category_match": float(click[matched].mean()) if matched.any() else float("nan"),
            "click_last_category_other": float(click[~matched].mean()) if (~matched).any() else float("nan"),
            "last_category_match_share": float(matched.mean()),
            "interest_match_share": float((category == latents["interest"]).mean()),
            "empty_history_share": {"train": float((lengths[~test] == 0).mean()),
                                    "test": float((lengths[test] == 0).mean())},
            "mean_history_length": {"train": float(lengths[~test].mean()), "test": float(lengths[test].mean())},
        },
    }  # fmt: skip
