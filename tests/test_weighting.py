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


def _gradnorm_case(slow_ratio: float, fast_ratio: float, fast_scale: float = 1.0):
    """Two terms on one shared parameter; returns the multipliers after the first update."""
    from torchrec_mtl.weighting import GradNormWeighting

    shared = torch.nn.Parameter(torch.ones(4))
    weighting = GradNormWeighting({"slow": 1.0, "fast": 1.0}, alpha=1.5, lr=0.1)
    weighting.attach([shared])
    weighting({"slow": shared.sum(), "fast": fast_scale * shared.sum()})  # step 0 records the initial losses
    total = weighting({"slow": slow_ratio * shared.sum(), "fast": fast_ratio * fast_scale * shared.sum()})
    return weighting, total


def test_gradnorm_raises_the_weight_of_the_term_that_trains_slower():
    weighting, _ = _gradnorm_case(slow_ratio=1.0, fast_ratio=0.2)
    multipliers = dict(zip(weighting.weights, weighting.multipliers.tolist()))
    assert multipliers["slow"] > 1.0 > multipliers["fast"], multipliers
    assert sum(multipliers.values()) == pytest.approx(2.0), "multipliers are renormalised to the number of terms"


def test_gradnorm_balances_gradient_norms_at_equal_training_rates():
    weighting, total = _gradnorm_case(slow_ratio=1.0, fast_ratio=1.0, fast_scale=10.0)
    multipliers = dict(zip(weighting.weights, weighting.multipliers.tolist()))
    assert multipliers["fast"] < 1.0 < multipliers["slow"], "the term with 10x the gradient norm is turned down"
    # the returned loss uses the multipliers as constants: its gradient reaches the shared parameter only
    assert total.requires_grad and not weighting.multipliers.requires_grad


def test_gradnorm_needs_shared_parameters():
    from torchrec_mtl.weighting import GradNormWeighting

    with pytest.raises(ValueError, match="gradnorm needs a tower with shared parameters"):
        GradNormWeighting({"a": 1.0}).attach([])


def test_sharded_tables_keep_no_gradient_so_gradnorm_measures_the_tower():
    """Table-wise sharded tables train inside backward (fused TBE): no .grad to take per-task norms from."""
    import numpy as np

    from torchrec_mtl.config import JobConfig
    from torchrec_mtl.data.loader import BatchLoader
    from torchrec_mtl.data.shards import EncodedLog
    from torchrec_mtl.build import build_model
    from torchrec_mtl.model import MultiTaskTrain
    from esmm import EsmmObjective
    from torchrec_mtl.train.distributed import init_distributed, shard_model

    features = [f"C{i}" for i in range(1, 5)]
    torch.manual_seed(0)
    model = build_model(JobConfig().model, 13, {f: 500 for f in features})
    objective = EsmmObjective(weighting="gradnorm")
    sharded, _ = shard_model(MultiTaskTrain(model, objective), init_distributed(), sharding_types=["table_wise"])
    rng = np.random.default_rng(0)
    n = 64
    log = EncodedLog(
        rng.random((n, 13), dtype=np.float32),
        rng.integers(0, 500, (n, 4)).astype(np.int32),
        {"click": (rng.random(n) < 0.5).astype(np.float32), "conversion": np.zeros(n, np.float32),
         "rating": np.full(n, 3.0, np.float32)},
    )  # fmt: skip
    loss, _ = sharded(next(iter(BatchLoader(log, features, n, shuffle=False))))
    loss.backward()
    tables = [p for name, p in sharded.named_parameters() if "embedding_bags" in name]
    assert len(tables) == 4 and all(p.grad is None for p in tables)
    assert all(p.grad is not None for p in model.tower.shared_parameters())
    assert int(objective.weighting.steps) == 1, "the multipliers were updated from the tower's gradient norms"
