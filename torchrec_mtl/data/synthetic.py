"""A synthetic multi-task Criteo-style log with a planted truth.

Latent user and item factors decide p(click), p(conversion | click) and the expected rating of each impression, so
the best any model can do on the test split (the Bayes-optimal AUC and RMSE, the "ceiling") is computed from the
written probabilities rather than guessed.

The planted structure:

- Items have a category and a brand (observed as categorical features), a click appeal (mostly the item's own), a
  conversion appeal that shares part of the click appeal (funnels share structure), and a price (an integer
  feature). Popularity is Zipf-distributed.
- Users have a segment (observed) whose taste over item categories they share, plus an individual taste, a click
  propensity and a purchase propensity. Activity is log-normal, so a few users produce many rows.
- Context: a device (categorical), a slot position and an hour (integer features) shift p(click).
- p(conversion | click) uses the user's taste for the item's category again (the shared part), the item's
  conversion appeal, the user's purchase propensity and the price.
- The rating is observed only on clicked rows (missing elsewhere, never 0), in half stars from 0.5 to 5.
- Each item's description is written from its latent attributes (category words, appeal and price words), so the text
  carries signal; a share of items appears only in the test split (cold items).

Output files in ``out_dir``: ``train.tsv`` and ``test.tsv`` (click, conversion, rating, I1..I13, C1..C8; no header;
empty fields are missing), ``items.tsv`` (item_id, description), ``test_truth.tsv`` (p_click, p_conversion_given_click,
expected_rating for each test row, in order) and ``meta.json`` (the config, row counts, rates and ceilings).

Example::

    >>> from torchrec_mtl.data.synthetic import SyntheticConfig, generate
    >>> summary = generate(SyntheticConfig(num_rows=20_000, seed=1), "/tmp/synth")  # doctest: +SKIP
    >>> summary["ceilings"]["ctr_auc"]  # doctest: +SKIP
    0.77
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import polars as pl

from torchrec_mtl.data.synthetic_affinity import decomposed_ceilings, draw_affinity_latents
from torchrec_mtl.data.synthetic_history import click_histories, draw_history_latents, history_summary
from torchrec_mtl.data.synthetic_text import CATEGORY_WORDS, item_descriptions
from torchrec_mtl.outputs import new_files

# Bumped whenever the same config would generate different data, so a stale log is regenerated, never reused.
GENERATOR_VERSION = 2
LABEL_COLUMNS: List[str] = ["click", "conversion", "rating"]
NUM_INT_COLUMNS = 13
NUM_CAT_COLUMNS = 8
USER_ID_COLUMN = "C1"
ITEM_ID_COLUMN = "C2"
# What each categorical column holds, for readers of the generated files.
CATEGORICAL_MEANING: Dict[str, str] = {
    "C1": "user id",
    "C2": "item id",
    "C3": "item category",
    "C4": "user segment",
    "C5": "device",
    "C6": "item brand",
    "C7": "session token (high cardinality, no effect)",
    "C8": "ad format (no effect)",
}
INTEGER_MEANING: Dict[str, str] = {
    "I1": "slot position (1 = top)",
    "I2": "hour of day",
    "I3": "user's past clicks (noisy proxy of click propensity)",
    "I4": "item price in cents",
    "I5": "item age in days",
    "I6": "user's past purchases (noisy proxy of purchase propensity)",
    **{f"I{k}": "noise count (no effect)" for k in range(7, NUM_INT_COLUMNS + 1)},
}

_DEVICE_EFFECT = np.array([0.0, -0.3, 0.25, -0.5])
PROFILES = ("default", "affinity", "history")
# the history profile's list columns, after C8 (torchrec_mtl.data.synthetic_history)
HISTORY_MEANING: Dict[str, str] = {
    "hist_item": "the user's clicked items (C2) on earlier rows, oldest first, |-separated",
    "hist_category": "the category (C3) of each hist_item, aligned",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and difficulty of the generated log; ``seed`` makes every draw repeatable."""

    num_rows: int = 3_000_000
    test_fraction: float = 0.2
    num_users: int = 4_000
    num_items: int = 2_000
    num_categories: int = 12
    num_segments: int = 16
    num_brands: int = 200
    num_sessions: int = 5_000
    cold_item_fraction: float = 0.05
    zipf_exponent: float = 1.0
    click_rate: float = 0.06
    conversion_rate: float = 0.2
    seed: int = 0
    # "default": the planted structure above; "affinity": a user x item-attribute affinity drives most of the click,
    # with few impressions per user (torchrec_mtl.data.synthetic_affinity); "history": a drifting interest drives the
    # click, each row carries the user's recent clicks as list columns (torchrec_mtl.data.synthetic_history)
    profile: str = "default"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {self.profile!r}")
        for name in ("num_rows", "num_users", "num_items", "num_categories", "num_segments", "num_brands",
                     "num_sessions"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.num_categories > len(CATEGORY_WORDS):
            raise ValueError(f"num_categories: at most {len(CATEGORY_WORDS)}, got {self.num_categories}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: must lie in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.cold_item_fraction < 1.0:
            raise ValueError(f"cold_item_fraction: must lie in [0, 1), got {self.cold_item_fraction}")


def hex_id(kind: str, index: np.ndarray) -> np.ndarray:
    """Criteo-style 8-hex-digit hashes of ``kind:index``, stable across runs and machines."""
    uniques = np.unique(index)
    hashes = np.array(
        [hashlib.blake2b(f"{kind}:{i}".encode(), digest_size=4).hexdigest() for i in uniques.tolist()], dtype="<U8"
    )
    return hashes[np.searchsorted(uniques, index)]


def _calibrated_bias(logits_without_bias: np.ndarray, target_mean: float, weights: np.ndarray | None = None) -> float:
    """The intercept that makes the (weighted) mean of sigmoid(bias + logits) equal ``target_mean`` (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        if np.average(_sigmoid(mid + logits_without_bias), weights=weights) < target_mean:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _half_star_rating(mean: np.ndarray, noise_std: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Observed half-star ratings and their exact conditional expectation E[rating | mean]."""
    import torch  # here, not at the top: the config checks import this module, and the command line starts fast

    observed = np.clip(np.round((mean + rng.normal(0.0, noise_std, mean.shape)) * 2) / 2, 0.5, 5.0)
    # rating = v where the latent lies in [v - 0.25, v + 0.25), with the two ends absorbing the tails.
    stars = np.arange(0.5, 5.01, 0.5)
    upper = torch.from_numpy(np.append(stars[:-1] + 0.25, np.inf))
    lower = torch.from_numpy(np.insert(stars[1:] - 0.25, 0, -np.inf))
    latent = torch.from_numpy(mean)[:, None]
    prob = torch.special.ndtr((upper - latent) / noise_std) - torch.special.ndtr((lower - latent) / noise_std)
    expected = (prob * torch.from_numpy(stars)).sum(dim=1).numpy()
    return observed, expected


def generate(config: SyntheticConfig, out_dir: str | os.PathLike) -> Dict:
    """Write the log, the items file, the test truth and ``meta.json``; return the meta dict."""
    with new_files(out_dir, "synthetic", last="meta.json") as out:
        return _generate(config, out)


def draw_impressions(
    config: SyntheticConfig, rng: np.random.Generator, activity: np.ndarray, popularity: np.ndarray, cold: np.ndarray
) -> Tuple[np.ndarray, ...]:
    """The impressions of every profile: ``(is_test, user, item, device, position, hour)``, one per row. Users are
    drawn by ``activity``; train rows never show a ``cold`` item, test rows draw from every item by ``popularity``."""
    num_test = int(round(config.num_rows * config.test_fraction))
    num_train = config.num_rows - num_test
    is_test = np.concatenate([np.zeros(num_train, dtype=bool), np.ones(num_test, dtype=bool)])
    user = rng.choice(config.num_users, config.num_rows, p=activity / activity.sum())
    warm_popularity = np.where(cold, 0.0, popularity)
    item = np.concatenate(
        [
            rng.choice(config.num_items, num_train, p=warm_popularity / warm_popularity.sum()),
            rng.choice(config.num_items, num_test, p=popularity / popularity.sum()),
        ]
    )
    device = rng.choice(4, config.num_rows, p=[0.5, 0.3, 0.15, 0.05])
    position = rng.integers(1, 21, config.num_rows)
    hour = rng.integers(0, 24, config.num_rows)
    return is_test, user, item, device, position, hour


def draw_latents(config: SyntheticConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """The generator's draws up to the click labels: item and user latents, the impressions and their true
    probabilities, by name (``item_category``, ``click_appeal``, ``cold``, ``is_test``, ``user``, ``item``,
    ``click_logit``, ``p_click``, ``p_conversion`` ...). ``rng`` must be ``np.random.default_rng(config.seed)``
    for the log's own draws; it is left where the generator draws the clicks next (``rng.random(num_rows)``).

    Example::

        >>> config = SyntheticConfig(num_rows=1_000, num_users=50, num_items=40, num_brands=8, seed=1)
        >>> rng = np.random.default_rng(config.seed)
        >>> latents = draw_latents(config, rng)
        >>> clicked = rng.random(config.num_rows) < latents["p_click"]  # the log's click labels
        >>> int(latents["is_test"].sum())
        200
    """
    if config.profile == "affinity":
        return draw_affinity_latents(config, rng)
    if config.profile == "history":
        return draw_history_latents(config, rng)
    num_users, num_items, num_cat = config.num_users, config.num_items, config.num_categories

    # Items.
    item_category = rng.integers(0, num_cat, num_items)
    item_brand = rng.integers(0, config.num_brands, num_items)
    # Most of an item's click appeal is its own (its ID learns it when warm; its description tells it when cold);
    # the brand explains a little.
    brand_click_appeal = rng.normal(0.0, 0.2, config.num_brands)
    brand_conversion_appeal = rng.normal(0.0, 0.3, config.num_brands)
    click_appeal = brand_click_appeal[item_brand] + rng.normal(0.0, 0.6, num_items)
    conversion_appeal = 0.6 * click_appeal + brand_conversion_appeal[item_brand] + rng.normal(0.0, 0.2, num_items)
    price = np.round(np.exp(rng.normal(8.0, 0.8, num_items))).astype(np.int64)  # cents, median ~30 units
    item_age_days = rng.integers(0, 1000, num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** config.zipf_exponent
    popularity = popularity[rng.permutation(num_items)]
    cold = np.zeros(num_items, dtype=bool)
    cold[rng.choice(num_items, int(round(config.cold_item_fraction * num_items)), replace=False)] = True

    # Users.
    user_segment = rng.integers(0, config.num_segments, num_users)
    segment_taste = rng.normal(0.0, 0.7, (config.num_segments, num_cat))
    user_taste = segment_taste[user_segment] + rng.normal(0.0, 0.2, (num_users, num_cat))
    click_propensity = rng.normal(0.0, 0.3, num_users)
    purchase_propensity = rng.normal(0.0, 0.2, num_users)
    activity = np.exp(rng.normal(0.0, 0.8, num_users))

    is_test, user, item, device, position, hour = draw_impressions(config, rng, activity, popularity, cold)

    taste = user_taste[user, item_category[item]]
    click_logit = (
        taste
        + click_appeal[item]
        + click_propensity[user]
        + _DEVICE_EFFECT[device]
        - 0.5 * np.log(position)
        + 0.15 * np.sin(2 * np.pi * hour / 24)
    )
    log_price = np.log(price[item]) - 8.0
    conversion_logit = 0.8 * taste + conversion_appeal[item] + purchase_propensity[user] - 0.8 * log_price
    train_rows = ~is_test
    p_click = _sigmoid(click_logit + _calibrated_bias(click_logit[train_rows], config.click_rate))
    # Weighted by p(click): the conversion rate is a rate among clicks, and clicks favour high-taste rows.
    p_conversion = _sigmoid(
        conversion_logit
        + _calibrated_bias(conversion_logit[train_rows], config.conversion_rate, weights=p_click[train_rows])
    )
    return {
        "item_category": item_category,
        "item_brand": item_brand,
        "brand_click_appeal": brand_click_appeal,
        "brand_conversion_appeal": brand_conversion_appeal,
        "click_appeal": click_appeal,
        "conversion_appeal": conversion_appeal,
        "price": price,
        "item_age_days": item_age_days,
        "popularity": popularity,
        "cold": cold,
        "user_segment": user_segment,
        "segment_taste": segment_taste,
        "user_taste": user_taste,
        "click_propensity": click_propensity,
        "purchase_propensity": purchase_propensity,
        "activity": activity,
        "is_test": is_test,
        "user": user,
        "item": item,
        "device": device,
        "position": position,
        "hour": hour,
        "taste": taste,
        "click_logit": click_logit,
        "conversion_logit": conversion_logit,
        "p_click": p_click,
        "p_conversion": p_conversion,
    }


def _generate(config: SyntheticConfig, out: Path) -> Dict:
    rng = np.random.default_rng(config.seed)
    latents = draw_latents(config, rng)
    item_category, item_brand, price = latents["item_category"], latents["item_brand"], latents["price"]
    click_appeal, conversion_appeal = latents["click_appeal"], latents["conversion_appeal"]
    item_age_days, cold, user_segment = latents["item_age_days"], latents["cold"], latents["user_segment"]
    click_propensity, purchase_propensity = latents["click_propensity"], latents["purchase_propensity"]
    is_test, user, item, device = latents["is_test"], latents["user"], latents["item"], latents["device"]
    position, hour, taste = latents["position"], latents["hour"], latents["taste"]
    p_click, p_conversion = latents["p_click"], latents["p_conversion"]
    num_items = config.num_items
    num_test = int(is_test.sum())
    num_train = config.num_rows - num_test

    click = rng.random(config.num_rows) < p_click
    conversion = click & (rng.random(config.num_rows) < p_conversion)
    rating_mean = 3.3 + 0.5 * taste + 0.6 * click_appeal[item] + 0.4 * conversion_appeal[item]
    rating, expected_rating = _half_star_rating(rating_mean, 0.6, rng)

    past_clicks = rng.poisson(np.exp(1.5 + 2.0 * click_propensity[user]))
    past_purchases = rng.poisson(np.exp(1.0 + 3.0 * purchase_propensity[user]))
    noise_counts = (
        rng.geometric(rng.uniform(0.05, 0.5, NUM_INT_COLUMNS - 6), (config.num_rows, NUM_INT_COLUMNS - 6)) - 1
    )
    int_columns = np.column_stack(
        [position, hour, past_clicks, price[item], item_age_days[item], past_purchases, noise_counts]
    )
    missing = rng.random(int_columns.shape) < np.array([0.0, 0.0, 0.05, 0.0, 0.1, 0.05] + [0.2] * (NUM_INT_COLUMNS - 6))

    frame = pl.DataFrame(
        {
            "click": click.astype(np.int8),
            "conversion": conversion.astype(np.int8),
            "rating": pl.Series(np.where(click, rating, np.nan)).fill_nan(None),
            **{
                f"I{k + 1}": pl.Series(int_columns[:, k]).set(pl.Series(missing[:, k]), None)
                for k in range(NUM_INT_COLUMNS)
            },
            "C1": hex_id("user", user),
            "C2": hex_id("item", item),
            "C3": hex_id("category", item_category[item]),
            "C4": hex_id("segment", user_segment[user]),
            "C5": hex_id("device", device),
            "C6": hex_id("brand", item_brand[item]),
            "C7": hex_id("session", rng.integers(0, config.num_sessions, config.num_rows)),
            "C8": hex_id("format", rng.integers(0, 6, config.num_rows)),
        }
    )
    if config.profile == "history":  # after every other draw: the other columns are what they would be without it
        hist_item, hist_category, last_category, bounds = click_histories(latents, click)
        frame = frame.with_columns(
            pl.Series("hist_item", hist_item, dtype=pl.String),
            pl.Series("hist_category", hist_category, dtype=pl.String),
        )
    write = dict(separator="\t", include_header=False, null_value="")
    frame.slice(0, num_train).write_csv(out / "train.tsv", **write)
    frame.slice(num_train).write_csv(out / "test.tsv", **write)
    pl.DataFrame(
        {
            "p_click": p_click[is_test],
            "p_conversion_given_click": p_conversion[is_test],
            "expected_rating": expected_rating[is_test],
        }
    ).write_csv(out / "test_truth.tsv", separator="\t")
    pl.DataFrame(
        {
            "item_id": hex_id("item", np.arange(num_items)),
            "description": item_descriptions(item_category, click_appeal, conversion_appeal, price, rng),
        }
    ).write_csv(out / "items.tsv", separator="\t")

    test_click, test_conversion = click[is_test], conversion[is_test]
    meta = {
        "config": dataclasses.asdict(config),
        "generator_version": GENERATOR_VERSION,
        "columns": {"labels": LABEL_COLUMNS, "integer": INTEGER_MEANING, "categorical": CATEGORICAL_MEANING},
        "rows": {"train": num_train, "test": num_test},
        "rates": {
            "click": float(click.mean()),
            "conversion_given_click": float(conversion[click].mean()),
            "cold_item_share_of_test_rows": float(cold[item[is_test]].mean()),
        },
        "ceilings": ceilings(
            p_click[is_test],
            p_conversion[is_test],
            expected_rating[is_test],
            test_click,
            test_conversion,
            rating[is_test],
        ),
    }
    if config.profile == "affinity":
        meta["ceilings"].update(decomposed_ceilings(latents, click, conversion))
    if config.profile == "history":
        summary = history_summary(latents, click, last_category, bounds)
        meta["ceilings"].update(summary["ceilings"])
        meta["rates"]["history"] = summary["rates"]
        meta["columns"]["lists"] = HISTORY_MEANING
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC by torchrec's own implementation, the one the evaluation uses."""
    import torch
    from torchrec.metrics.auc import compute_auc

    as_tensor = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64)).view(1, -1)  # noqa: E731
    return float(
        compute_auc(1, [as_tensor(scores)], [as_tensor(labels)], [torch.ones(1, len(scores), dtype=torch.float64)])
    )


def ceilings(
    p_click: np.ndarray,
    p_conversion: np.ndarray,
    expected_rating: np.ndarray,
    click: np.ndarray,
    conversion: np.ndarray,
    rating: np.ndarray,
) -> Dict[str, float]:
    """Bayes-optimal test metrics: each task scored by its true probability (or expected rating)."""
    click, conversion = click.astype(bool), conversion.astype(bool)
    return {
        "ctr_auc": binary_auc(p_click, click),
        "cvr_auc": binary_auc(p_conversion[click], conversion[click]),
        "ctcvr_auc": binary_auc(p_click * p_conversion, conversion),
        "rating_rmse": float(math.sqrt(np.mean((expected_rating[click] - rating[click]) ** 2))),
    }
