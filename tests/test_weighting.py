"""Loss weighting: static weights as configured; uncertainty weighting moves weight away from the noisier task."""

from __future__ import annotations

import math

import pytest
import torch

from torchrec_mtl.weighting import StaticWeighting, UncertaintyWeighting, make_weighting


def test_static_weighting_is_the_weighted_sum_and_skips_zero_weights():
    weighting = StaticWeighting({"ctr": 1.0, "rating": 0.5, "cvr_ips": 0.0})
    losses = {"ctr": torch.tensor(0.4), "rating": torch.tensor(2.0), "cvr_ips": torch.tensor(float("nan"))}
    assert float(weighting(losses)) == pytest.approx(0.4 + 1.0)
    assert weighting.effective_weights() == {"ctr": 1.0, "rating": 0.5}


def test_uncertainty_weighting_gives_the_noisier_task_the_smaller_weight():
    torch.manual_seed(0)
    weighting = UncertaintyWeighting({"noisy": 1.0, "clean": 1.0, "off": 0.0})
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    assert weighting.effective_weights() == {"noisy": 1.0, "clean": 1.0}
    for _ in range(600):
        # per-batch losses around 2.0 and 0.1: the noisy task's residuals are larger
        losses = {"noisy": 2.0 + 0.2 * torch.randn(()), "clean": 0.1 + 0.01 * torch.randn(())}
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()
    weights = weighting.effective_weights()
    assert weights["noisy"] < 0.7 < 5.0 < weights["clean"], weights
    # at the optimum exp(-s) = 1 / L
    assert weights["noisy"] == pytest.approx(1 / 2.0, rel=0.15) and weights["clean"] == pytest.approx(10.0, rel=0.15)
    assert "off" not in dict(weighting.named_parameters()).keys()


def test_uncertainty_weighting_scales_the_gradient_every_parameter_sees():
    # What a fused embedding optimizer receives is d(total)/d(row): the effective weights scale it like any dense one.
    row = torch.nn.Parameter(torch.ones(3))
    weighting = UncertaintyWeighting({"a": 1.0, "b": 1.0})
    with torch.no_grad():
        weighting.log_variance["a"].fill_(math.log(4.0))
    weighting({"a": (row**2).sum(), "b": row.sum()}).backward()
    torch.testing.assert_close(row.grad, torch.full((3,), 2.0 / 4.0 + 1.0))


def test_unknown_weighting_is_refused_by_name():
    with pytest.raises(ValueError, match="weighting: 'gradnorm2'"):
        make_weighting("gradnorm2", {"ctr": 1.0})
