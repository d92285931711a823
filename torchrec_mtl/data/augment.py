"""Training-batch augmentation (``training.augmentation``), drawn in the loader from a stream of its own seed.

- **feature dropout**: each training row's ID in a feature is replaced, with that feature's probability, by row 0,
  the row that rare and unseen IDs share (as ``training.item_id_dropout`` does for the item), so the model learns
  to predict without that field and row 0 is trained for every feature, not only on rare IDs.
- **text mixing**: each training row whose item has text gets a partner, a random row of the same batch whose
  item has text, and a weight ``w ~ U(0, text_mix)``; the model uses ``v + w (v_partner - v)`` as the row's text
  vector before the projection (torchrec_mtl.modules.item_text.mix_rows), the labels staying the row's own. The
  loader draws; the model mixes (the vectors live in a sharded table), reading the batch's ``augmentation``.

Reproducible: the draws come from ``numpy.random.default_rng(SeedSequence([seed, epoch], spawn_key=(1,)))``, apart
from the shuffle stream (so turning augmentation on leaves the row order alone), and every rank draws the whole
global batch's numbers and keeps its own rows' (so the masks and weights do not depend on the world size; a text
partner is picked among the rank's own rows). A skipped batch (a resume mid-epoch) makes the same draws.

Example::

    >>> augment = Augmentation(feature_dropout={0: 0.5}, text_mix=0.2, text_column=1, seed=0)
    >>> columns = np.array([[5, 6, 7, 8], [3, 0, 4, 9]])
    >>> drawn = augment.apply(columns, augment.generator(epoch=0), rank=0, world_size=1)
    >>> columns[0].tolist(), sorted(drawn)
    ([5, 0, 7, 0], ['text_mix_partner', 'text_mix_weight'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from torchrec_mtl.data.batch import TEXT_MIX_PARTNER, TEXT_MIX_WEIGHT


@dataclass(frozen=True)
class Augmentation:
    """What the loader does to each training batch.

    Args:
        feature_dropout: sparse column (its index in the loader's features) -> probability of replacing its ID with
            row 0.
        text_mix: the largest share of a partner's text vector in a row's (0: no text mixing).
        text_column: the sparse column of the item-text rows (needed with ``text_mix``).
        seed: the stream's seed.
    """

    feature_dropout: Dict[int, float] = field(default_factory=dict)
    text_mix: float = 0.0
    text_column: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for column, p in self.feature_dropout.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"feature_dropout[{column}]: {p}; allowed: 0 <= p < 1")
        if not 0.0 <= self.text_mix <= 1.0:
            raise ValueError(f"text_mix: {self.text_mix}; allowed: 0 to 1")
        if self.text_mix > 0 and self.text_column is None:
            raise ValueError("text_mix: the batches have no item-text column to mix")

    @classmethod
    def from_config(
        cls,
        feature_names: Sequence[str],
        feature_dropout: float | Mapping[str, float],
        text_mix: float,
        seed: int,
        categorical: Sequence[str],
        text_feature: Optional[str] = None,
    ) -> Optional["Augmentation"]:
        """The augmentation a config asks for over a loader's ``feature_names`` (None when it asks for none): a
        single ``feature_dropout`` share applies to every ``categorical`` feature, a mapping to the features it
        names (the item-text feature included: row 0 is "no text")."""
        shares = dict.fromkeys(categorical, feature_dropout) if isinstance(feature_dropout, float) else feature_dropout
        unknown = [name for name in shares if name not in feature_names]
        if unknown:
            raise ValueError(f"feature_dropout: {unknown} are not features of the batches ({', '.join(feature_names)})")
        dropout = {feature_names.index(name): float(p) for name, p in shares.items() if p > 0}
        if not dropout and text_mix <= 0:
            return None
        text_column = feature_names.index(text_feature) if text_feature in feature_names else None
        return cls(dropout, text_mix, text_column, seed)

    def generator(self, epoch: int) -> np.random.Generator:
        """Epoch ``epoch``'s stream (apart from the loader's shuffle stream of the same seed)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch], spawn_key=(1,)))

    def _draws(self) -> int:
        return len(self.feature_dropout) + (2 if self.text_mix > 0 else 0)

    def skip(self, rng: np.random.Generator, global_rows: int) -> None:
        """Make a skipped batch's draws (those ``apply`` would make)."""
        for _ in range(self._draws()):
            rng.random(global_rows)

    def apply(
        self, columns: np.ndarray, rng: np.random.Generator, rank: int, world_size: int
    ) -> Dict[str, torch.Tensor]:
        """Drop IDs in ``columns`` ([features, B], this rank's rows) in place; return the batch's ``augmentation``
        (the text-mixing partners and weights, or nothing)."""
        rows = columns.shape[1]
        mine = slice(rank * rows, (rank + 1) * rows)
        for column, p in self.feature_dropout.items():
            dropped = rng.random(rows * world_size)[mine] < p
            columns[column, dropped] = 0
        if self.text_mix <= 0:
            return {}
        weight = (self.text_mix * rng.random(rows * world_size)[mine]).astype(np.float32)
        pick = rng.random(rows * world_size)[mine]
        has_text = columns[self.text_column] != 0  # after dropout: a dropped text row is no text
        candidates = np.flatnonzero(has_text)
        partner = np.arange(rows)
        if len(candidates):
            partner = candidates[np.minimum((pick * len(candidates)).astype(np.int64), len(candidates) - 1)]
        weight[~has_text] = 0.0
        return {TEXT_MIX_PARTNER: torch.from_numpy(partner), TEXT_MIX_WEIGHT: torch.from_numpy(weight)}

