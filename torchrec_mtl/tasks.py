"""The objective of the spine: CTR and CVR the ESMM way, plus a rating regression.

ESMM (Ma et al., SIGIR 2018) learns CVR over the entire impression space: pCTCVR = pCTR x pCVR is supervised by
click-and-convert on every row, pCTR by click on every row, so pCVR is never fitted on the clicked rows alone and
carries no sample selection bias. The rating loss counts only rows whose rating is present.

The product alone teaches pCVR slowly: on an unclicked row its gradient is scaled by pCTR, a few percent. The optional
``cvr_ips`` term is ESCM2's counterfactual regulariser (Wang et al., SIGIR 2022): pCVR's own loss on clicked rows,
each weighted by 1 / pCTR (detached, self-normalised), which estimates that loss over the entire impression space, so
it adds a direct signal without bringing the selection bias back.

Evaluated tasks and their sample spaces (a label is NaN outside its space, which drives loss and metrics alike):

==========  ==================  ==========================  ==================
task        prediction          label                       rows
==========  ==================  ==========================  ==================
ctr         pCTR                click                       all
cvr         pCVR                conversion                  clicked rows
ctcvr       pCTR x pCVR         click and conversion        all
rating      rating output       rating                      rows with a rating
==========  ==================  ==========================  ==================
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.weighting import make_weighting

TOWER_TASKS = ["ctr", "cvr", "rating"]
LOSS_TERMS = ("ctr", "ctcvr", "cvr_ips", "rating")
EVALUATED_TASKS = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "rating": "regression"}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` weighted by ``mask`` (bool or float weights); 0 when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p < 0, stable near 0."""
    log_p = log_p.clamp(max=-1e-7)
    return torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


class EsmmObjective(nn.Module):
    """Loss and per-task predictions from the tower's ``ctr``, ``cvr`` and ``rating`` outputs.

    Args:
        click, conversion, rating: label column names in the batch.
        weights: loss weight per term (``ctr``, ``ctcvr``, ``cvr_ips``, ``rating``); ``cvr_ips`` defaults to 0.
        weighting: how the weighted terms combine (torchrec_mtl.weighting): ``static`` or ``uncertainty``.
        min_propensity: pCTR is clipped below at this value in the ``cvr_ips`` weights.
        rating_offset: added to the rating output, so the head starts near the typical rating.
    """

    def __init__(
        self,
        click: str = "click",
        conversion: str = "conversion",
        rating: str = "rating",
        weights: Dict[str, float] | None = None,
        rating_offset: float = 0.0,
        min_propensity: float = 0.01,
        weighting: str = "static",
    ) -> None:
        super().__init__()
        self.click, self.conversion, self.rating = click, conversion, rating
        unknown = sorted(set(weights or {}) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"weights: unknown loss term(s) {unknown}; allowed: {LOSS_TERMS}")
        self.weights = {"ctr": 1.0, "ctcvr": 1.0, "cvr_ips": 0.0, "rating": 1.0, **(weights or {})}
        self.weighting = make_weighting(weighting, self.weights)
        self.rating_offset = rating_offset
        self.min_propensity = min_propensity

    def forward(
        self, logits: Dict[str, torch.Tensor], batch: MultiTaskBatch
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
        """Returns ``(loss, (loss.detach(), predictions, labels))``, predictions detached, labels NaN off-task."""
        nan = torch.full_like(batch.row_weight, float("nan"))
        click_mask = batch.label_mask(self.click)
        ctcvr_mask = click_mask & batch.label_mask(self.conversion)
        rating_mask = batch.label_mask(self.rating)
        click = torch.nan_to_num(batch.labels[self.click])
        click_and_convert = click * torch.nan_to_num(batch.labels[self.conversion])
        rating = torch.nan_to_num(batch.labels[self.rating])
        clicked = ctcvr_mask & (click > 0)  # CVR's own sample space

        log_p_ctr = F.logsigmoid(logits["ctr"])
        log_p_ctcvr = log_p_ctr + F.logsigmoid(logits["cvr"])
        rating_prediction = logits["rating"] + self.rating_offset
        ctr_loss = F.binary_cross_entropy_with_logits(logits["ctr"], click, reduction="none")
        ctcvr_loss = -(click_and_convert * log_p_ctcvr + (1 - click_and_convert) * _log1mexp(log_p_ctcvr))
        rating_loss = (rating_prediction - rating) ** 2
        terms = {
            "ctr": masked_mean(ctr_loss, click_mask),
            "ctcvr": masked_mean(ctcvr_loss, ctcvr_mask),
            "rating": masked_mean(rating_loss, rating_mask),
        }
        if self.weights["cvr_ips"]:
            inverse_propensity = 1.0 / log_p_ctr.detach().exp().clamp(min=self.min_propensity)
            # on clicked rows, click-and-convert is the conversion label
            cvr_loss = F.binary_cross_entropy_with_logits(logits["cvr"], click_and_convert, reduction="none")
            terms["cvr_ips"] = masked_mean(cvr_loss, clicked * inverse_propensity)
        loss = self.weighting(terms)
        predictions = {
            "ctr": log_p_ctr.detach().exp(),
            "cvr": torch.sigmoid(logits["cvr"].detach()),
            "ctcvr": log_p_ctcvr.detach().exp(),
            "rating": rating_prediction.detach(),
        }
        labels = {
            "ctr": torch.where(click_mask, click, nan),
            "cvr": torch.where(clicked, click_and_convert, nan),
            "ctcvr": torch.where(ctcvr_mask, click_and_convert, nan),
            "rating": torch.where(rating_mask, rating, nan),
        }
        return loss, (loss.detach(), predictions, labels)
