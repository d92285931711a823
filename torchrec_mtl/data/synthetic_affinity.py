"""The ``affinity`` profile of the synthetic log: most of the click signal is a user x item-attribute affinity, as in
real logs, and each user has few impressions.

What it plants, beside the default profile's item, context and user effects:

- **A low-rank preference.** Each item has a vector built from its attributes, all observed: its category, its
  brand and its price band (``I4`` is the price). Each user has a preference vector of the same rank: a share
  (``SEGMENT_SHARE`` of its variance) from the user's segment (``C4``, observed), the rest the user's own, seen only
  through their clicks. The affinity is their dot product, scaled so that it carries most of the click logit's
  variance (``AFFINITY_STD`` against an item quality of ``ITEM_QUALITY_STD``).
- **Few impressions per user.** Activity is heavy-tailed (log-normal, sigma ``ACTIVITY_SIGMA``): with 1,000,000
  rows and 40,000 users the median user has about a dozen training rows and one click or none.
- **Position bias** (``POSITION_BIAS`` x log position), a device effect and an hour cycle.
- **Conversion partly driven by other factors than the click:** half the affinity, the user's own price
  sensitivity times the item's log price (not in the click), an item conversion quality only partly shared with
  the click quality, and the user's purchase propensity.

Its ceilings come with decompositions (``ctr_auc_without_affinity``, ``ctr_auc_without_item_quality``,
``cvr_auc_without_affinity``, ``cvr_auc_without_price_term``): the AUC of the true logit with one term taken out, so
a run can say which part of the signal it learned; and ``ctr_auc_segment_affinity_only``: the affinity known only
as far as the user's segment tells it (a model that learns no user's own taste).

Example::

    >>> from torchrec_mtl.data.synthetic import SyntheticConfig, generate
    >>> meta = generate(SyntheticConfig(profile="affinity", num_rows=1_000_000, num_users=40_000,
    ...                                 num_items=5_000), "runs/data/affinity")  # doctest: +SKIP
    >>> meta["ceilings"]["ctr_auc"], meta["ceilings"]["ctr_auc_without_affinity"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import numpy as np

if TYPE_CHECKING:  # the generator imports this module
    from torchrec_mtl.data.synthetic import SyntheticConfig

RANK = 8  # of the user and item vectors
SEGMENT_SHARE = 0.5  # of a user's preference variance that their segment explains
AFFINITY_STD = 1.2  # of the affinity term in the click logit
ITEM_QUALITY_STD = 0.4  # of the item's own click appeal
POSITION_BIAS = 0.6
ACTIVITY_SIGMA = 1.2
NUM_PRICE_BANDS = 5
DEVICE_EFFECT = np.array([0.0, -0.3, 0.25, -0.5])


def price_bands(price: np.ndarray) -> np.ndarray:
    """The price band (0 .. NUM_PRICE_BANDS - 1) of each price: its quantile among the prices."""
    edges = np.quantile(price, np.linspace(0, 1, NUM_PRICE_BANDS + 1)[1:-1])
    return np.searchsorted(edges, price, side="right")


def draw_affinity_latents(config: "SyntheticConfig", rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """The affinity profile's draws up to the click labels, under the names ``synthetic.draw_latents`` returns
    (``taste`` is the affinity), plus ``affinity``, ``item_quality`` and the conversion's own ``price_term``."""
    from torchrec_mtl.data.synthetic import _calibrated_bias, _sigmoid, draw_impressions

    num_users, num_items, num_cat = config.num_users, config.num_items, config.num_categories

    # Items: attributes, then a vector made of them, and an own quality.
    item_category = rng.integers(0, num_cat, num_items)
    item_brand = rng.integers(0, config.num_brands, num_items)
    price = np.round(np.exp(rng.normal(8.0, 0.8, num_items))).astype(np.int64)
    band = price_bands(price)
    category_vectors = rng.normal(0.0, 1.0, (num_cat, RANK))
    brand_vectors = rng.normal(0.0, 0.6, (config.num_brands, RANK))
    band_vectors = rng.normal(0.0, 0.5, (NUM_PRICE_BANDS, RANK))
    item_vector = category_vectors[item_category] + brand_vectors[item_brand] + band_vectors[band]
    brand_click_appeal = rng.normal(0.0, 0.15, config.num_brands)
    brand_conversion_appeal = rng.normal(0.0, 0.3, config.num_brands)
    click_appeal = brand_click_appeal[item_brand] + rng.normal(0.0, ITEM_QUALITY_STD, num_items)
    conversion_appeal = 0.4 * click_appeal + brand_conversion_appeal[item_brand] + rng.normal(0.0, 0.4, num_items)
    item_age_days = rng.integers(0, 1000, num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** config.zipf_exponent
    popularity = popularity[rng.permutation(num_items)]
    cold = np.zeros(num_items, dtype=bool)
    cold[rng.choice(num_items, int(round(config.cold_item_fraction * num_items)), replace=False)] = True

    # Users: a preference vector, part segment and part own; propensities; heavy-tailed activity.
    user_segment = rng.integers(0, config.num_segments, num_users)
    segment_vectors = rng.normal(0.0, 1.0, (config.num_segments, RANK))
    own = rng.normal(0.0, 1.0, (num_users, RANK))
    user_vector = np.sqrt(SEGMENT_SHARE) * segment_vectors[user_segment] + np.sqrt(1 - SEGMENT_SHARE) * own
    click_propensity = rng.normal(0.0, 0.3, num_users)
    purchase_propensity = rng.normal(0.0, 0.3, num_users)
    price_sensitivity = rng.normal(0.8, 0.5, num_users)
    activity = np.exp(rng.normal(0.0, ACTIVITY_SIGMA, num_users))

    is_test, user, item, device, position, hour = draw_impressions(config, rng, activity, popularity, cold)

    raw_affinity = np.einsum("nk,nk->n", user_vector[user], item_vector[item])
    scale = AFFINITY_STD / raw_affinity[~is_test].std()
    affinity = scale * raw_affinity
    # the part of it the user's segment alone tells: what a model that never learns a user's own taste can reach
    segment_affinity = scale * np.sqrt(SEGMENT_SHARE) * np.einsum(
        "nk,nk->n", segment_vectors[user_segment[user]], item_vector[item]
    )
    item_quality = click_appeal[item]
    context = DEVICE_EFFECT[device] - POSITION_BIAS * np.log(position) + 0.15 * np.sin(2 * np.pi * hour / 24)
    click_logit = affinity + item_quality + click_propensity[user] + context
    log_price = np.log(price[item]) - 8.0
    price_term = -price_sensitivity[user] * log_price
    conversion_logit = 0.5 * affinity + price_term + conversion_appeal[item] + purchase_propensity[user]
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
        "popularity": popularity, "cold": cold, "user_segment": user_segment, "click_propensity": click_propensity,
        "purchase_propensity": purchase_propensity, "activity": activity, "is_test": is_test, "user": user,
        "item": item, "device": device, "position": position, "hour": hour, "taste": affinity,
        "click_logit": click_logit, "conversion_logit": conversion_logit, "p_click": p_click,
        "p_conversion": p_conversion, "affinity": affinity, "segment_affinity": segment_affinity, "item_quality": item_quality,
        "price_term": price_term,
    }  # fmt: skip


def decomposed_ceilings(latents: Dict[str, np.ndarray], click: np.ndarray, conversion: np.ndarray) -> Dict[str, float]:
    """The test AUC of the true click and conversion logits with one term taken out: what a model reaches that
    learned everything but that term."""
    from torchrec_mtl.data.synthetic import binary_auc

    test = latents["is_test"]
    click, conversion = click[test], conversion[test]
    clicked = click.astype(bool)
    click_logit, conversion_logit = latents["click_logit"][test], latents["conversion_logit"][test]
    affinity, quality = latents["affinity"][test], latents["item_quality"][test]
    return {
        "ctr_auc_without_affinity": binary_auc(click_logit - affinity, click),
        "ctr_auc_without_item_quality": binary_auc(click_logit - quality, click),
        "ctr_auc_segment_affinity_only": binary_auc(click_logit - affinity + latents["segment_affinity"][test], click),
        "cvr_auc_without_affinity": binary_auc((conversion_logit - 0.5 * affinity)[clicked], conversion[clicked]),
        "cvr_auc_without_price_term": binary_auc((conversion_logit - latents["price_term"][test])[clicked],
                                                 conversion[clicked]),
    }  # fmt: skip
