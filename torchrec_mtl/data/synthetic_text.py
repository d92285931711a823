"""The synthetic items' descriptions: the words the generator draws from and how it draws them. A description is
the only view of a cold item's appeal, through one of six appeal words.

Example::

    >>> rng = np.random.default_rng(0)
    >>> len(item_descriptions(np.arange(4), rng.normal(size=4), rng.normal(size=4), rng.uniform(1, 9, 4), rng))
    4
"""

from __future__ import annotations

from typing import List

import numpy as np

CATEGORY_WORDS = [
    ("kitchen", "cookware"),
    ("garden", "outdoor"),
    ("fitness", "sport"),
    ("books", "reading"),
    ("toys", "kids"),
    ("audio", "headphones"),
    ("beauty", "skincare"),
    ("office", "stationery"),
    ("travel", "luggage"),
    ("pets", "animals"),
    ("gaming", "console"),
    ("fashion", "apparel"),
    ("camera", "photo"),
    ("music", "instrument"),
    ("home", "decor"),
    ("auto", "car"),
]
# Six appeal levels (sextiles of the item's click appeal): the description is the only view of a cold item's appeal.
APPEAL_WORDS = [
    ("awful", "ugly"),
    ("dull", "plain"),
    ("ordinary", "standard"),
    ("nice", "pleasant"),
    ("popular", "stylish"),
    ("bestselling", "stunning"),
]
VALUE_WORDS = [("overpriced", "flimsy"), ("decent", "fair"), ("reliable", "durable"), ("great value", "loved")]
PRICE_WORDS = [("cheap",), ("affordable",), ("premium",), ("luxury",)]
FILLER_WORDS = ("new", "item", "edition", "model", "series", "pack", "set", "classic", "original", "version")


def item_descriptions(
    category: np.ndarray,
    click_appeal: np.ndarray,
    conversion_appeal: np.ndarray,
    price: np.ndarray,
    rng: np.random.Generator,
) -> List[str]:
    """One description per item: a word for its category, its click appeal (one of six levels), its value and its
    price band, two filler words, shuffled (all draws from ``rng``, in item order)."""

    def bucket(x: np.ndarray, levels: int = 4) -> np.ndarray:
        return np.searchsorted(np.quantile(x, np.linspace(0.0, 1.0, levels + 1)[1:-1]), x)

    appeal = bucket(click_appeal, len(APPEAL_WORDS))
    value, price_level = bucket(conversion_appeal), bucket(np.log(price))
    texts = []
    for i in range(category.size):
        words = [
            rng.choice(CATEGORY_WORDS[category[i]]),
            rng.choice(APPEAL_WORDS[appeal[i]]),
            rng.choice(VALUE_WORDS[value[i]]),
            rng.choice(PRICE_WORDS[price_level[i]]),
            *rng.choice(FILLER_WORDS, size=2, replace=False),
        ]
        rng.shuffle(words)
        texts.append(" ".join(str(w) for w in words))
    return texts
