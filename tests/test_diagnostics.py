"""Gate diagnostics read real towers through forward hooks (their task gates' where they expose them, so nothing runs
twice); warnings fire on collapsed experts and on leaks."""

from __future__ import annotations

import math

import pytest
import torch

from torchrec_mtl.modules.towers import MMoE, PLE, SharedBottom
from torchrec_mtl.train.diagnostics import GateMonitor, label_copy_warnings, leak_warnings


def _mmoe() -> MMoE:
    torch.manual_seed(0)
    return MMoE(in_features=6, task_names=["ctr", "cvr"], num_experts=4, expert_layer_sizes=[5])


def test_uniform_gates_have_maximal_entropy_and_equal_usage():
    tower = _mmoe()
    with torch.no_grad():
        for gate in tower.gates.values():
            gate.weight.zero_()
            gate.bias.zero_()
    with GateMonitor(tower) as monitor:
        tower(torch.randn(32, 6))
        tower(torch.randn(8, 6))
    summary = monitor.summary()
    assert monitor.rows == 40
    for task in ("ctr", "cvr"):
        assert summary[task]["entropy"] == pytest.approx(math.log(4))
        assert summary[task]["usage"] == pytest.approx([0.25] * 4)
    assert monitor.warnings() == []
    tower(torch.randn(4, 6))
    assert monitor.rows == 40, "the hook is removed when the monitor closes"


def test_an_expert_no_gate_uses_is_reported_as_collapsed():
    tower = _mmoe()
    with torch.no_grad():
        for gate in tower.gates.values():
            gate.bias[2] = -50.0
    with GateMonitor(tower) as monitor:
        tower(torch.randn(64, 6))
    warnings = monitor.warnings()
    assert len(warnings) == 1 and warnings[0].startswith("expert 2 collapsed")
    assert "model.tower.expert_dropout=0.1" in warnings[0] and "model.tower.gate_temperature=2" in warnings[0]
    assert sum(monitor.summary()["ctr"]["usage"]) == pytest.approx(1.0)


def test_a_gate_that_always_picks_one_expert_is_reported():
    tower = _mmoe()
    with torch.no_grad():
        tower.gates["cvr"].bias.copy_(torch.tensor([60.0, 0.0, 0.0, 0.0]))
    with GateMonitor(tower) as monitor:
        tower(torch.randn(64, 6))
    assert any(w.startswith("task cvr: its gate almost always picks one expert") for w in monitor.warnings())


def test_ple_gates_are_monitored_and_towers_without_gates_are_refused():
    torch.manual_seed(0)
    tower = PLE(6, ["ctr", "cvr"], num_levels=2, num_shared_experts=1, num_task_experts=2, expert_layer_sizes=[5])
    with GateMonitor(tower) as monitor:
        tower(torch.randn(16, 6))
    assert len(monitor.summary()["cvr"]["usage"]) == 3
    with pytest.raises(TypeError, match="SharedBottom has no gates"):
        GateMonitor(SharedBottom(6, ["ctr"], [5]))


def _gate_summary(weights: dict) -> dict:
    """The monitor's summary of one batch of gate weights, computed directly."""
    return {
        task: {"entropy": float(-(w * w.log()).sum(dim=-1).mean()), "usage": w.mean(dim=0).tolist()}
        for task, w in weights.items()
    }


def test_the_monitor_reads_the_gates_the_forward_ran_and_runs_no_level_twice():
    torch.manual_seed(0)
    tower = PLE(6, ["ctr", "cvr"], num_levels=2, num_shared_experts=1, num_task_experts=2, expert_layer_sizes=[5])
    calls = []
    # below the last level: what gate_weights would run again (its experts are one bank, one call a pass)
    tower.levels[0].shared_experts.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(16, 6)
    with GateMonitor(tower) as monitor:
        tower(x)
    assert len(calls) == 1, "one pass through the lower level: the forward's own"
    with torch.no_grad():
        expected = _gate_summary(tower.gate_weights(x))
    for task, values in monitor.summary().items():
        assert values["entropy"] == pytest.approx(expected[task]["entropy"], rel=1e-6)
        assert values["usage"] == pytest.approx(expected[task]["usage"], rel=1e-6)


def test_in_training_the_monitor_sees_the_gates_without_expert_dropout():
    torch.manual_seed(0)
    tower = MMoE(6, ["ctr", "cvr"], num_experts=4, expert_layer_sizes=[5], expert_dropout=0.5).train()
    x = torch.randn(64, 6)
    with GateMonitor(tower) as monitor:
        tower(x)  # training: the forward drops experts from each row's mix
    with torch.no_grad():
        expected = _gate_summary(tower.gate_weights(x))  # the weights without dropout
    assert monitor.rows == 64
    for task, values in monitor.summary().items():
        assert values["usage"] == pytest.approx(expected[task]["usage"], rel=1e-6)
        assert all(weight > 0.05 for weight in values["usage"]), "no expert dropped from the mean"


def test_a_tower_with_gate_weights_alone_is_watched_through_the_tower():
    class GateWeightsOnly(torch.nn.Module):
        """A plug-in tower: ``gate_weights`` and a forward, no task gates to watch."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = _mmoe()

        def gate_weights(self, features: torch.Tensor) -> dict:
            return self.inner.gate_weights(features)

        def forward(self, features: torch.Tensor) -> dict:
            return self.inner(features)

    tower = GateWeightsOnly()
    x = torch.randn(16, 6)
    with GateMonitor(tower) as monitor:
        tower(x)
    with torch.no_grad():
        expected = _gate_summary(tower.gate_weights(x))
    assert monitor.rows == 16
    assert monitor.summary()["cvr"]["usage"] == pytest.approx(expected["cvr"]["usage"], rel=1e-6)


def test_leak_warning_names_the_task():
    warnings = leak_warnings({"ctr": {"auc": 0.9996}, "cvr": {"auc": 0.71}, "rating": {"rmse": 0.6}})
    assert len(warnings) == 1 and warnings[0].startswith("task ctr: AUC 0.9996")
    # an AUC of 1 on one positive and one negative row is marked unreliable, not taken for a leak
    assert leak_warnings({"cvr": {"auc": 1.0, "rows": 2, "positives": 1}}) == []


def test_gradient_cosine_sees_agreement_and_conflict_on_shared_parameters():
    from torchrec_mtl.train.diagnostics import TaskGradientCosine

    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    monitor = TaskGradientCosine(every=2)
    monitor.attach([shared])
    for step in range(4):  # observed at calls 1 and 3
        monitor.observe({"a": (shared**2).sum(), "b": 3 * (shared**2).sum(), "c": -shared.sum() * (step + 1)})
    summary = monitor.summary()
    assert monitor.samples == 2 and summary["a|b"] == pytest.approx(1.0)
    expected = float(torch.nn.functional.cosine_similarity(2 * shared.detach(), -torch.ones(3), dim=0))
    assert summary["a|c"] == pytest.approx(expected, abs=1e-6) and summary["a|c"] < -0.1
    assert any(w.startswith("tasks a and c conflict") for w in monitor.warnings())


def test_a_mean_cosine_below_the_bound_within_its_noise_is_no_conflict():
    from torchrec_mtl.train.diagnostics import TaskGradientCosine

    shared = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    monitor = TaskGradientCosine(every=1)
    monitor.attach([shared])
    for angle in (0.3, -0.9, 0.2, -0.6, -0.1):  # cosines 0.3, -0.9, ...: mean -0.22, spread 0.5 over 5 samples
        monitor.observe({"a": shared[0], "b": angle * shared[0] + (1 - angle**2) ** 0.5 * shared[1]})
    assert monitor.summary()["a|b"] == pytest.approx(-0.22, abs=1e-6)
    assert monitor.warnings() == [], "a mean within two standard errors of 0 is not called a conflict"
    for _ in range(20):  # the same conflict, consistently
        monitor.observe({"a": shared[0], "b": -0.3 * shared[0] + 0.91**0.5 * shared[1]})
    assert monitor.warnings() and "over 25 sampled steps" in monitor.warnings()[0]


def test_a_feature_that_copies_a_label_is_named():
    import numpy as np

    rng = np.random.default_rng(0)
    n = 5000
    click = (rng.random(n) < 0.2).astype(np.float32)
    rating = np.where(click > 0, rng.integers(1, 6, n), np.nan).astype(np.float32)
    dense = np.column_stack([rng.random(n), 3 * click + 1, rng.random(n)]).astype(np.float32)
    sparse = np.column_stack([rng.integers(0, 50, n), 7 + click, rng.integers(0, 3, n)]).astype(np.int32)
    messages = label_copy_warnings(
        dense, sparse, {"click": click, "rating": rating}, ["I1", "I2", "I3"], ["C1", "C2", "C3"]
    )
    assert messages == [
        "feature I2 copies label click (correlation +1.0000)",
        "feature C2 gives label click away: each of its values has one label value",
    ]
    honest = label_copy_warnings(dense[:, [0, 2]], sparse[:, [0, 2]], {"click": click}, ["I1", "I3"], ["C1", "C3"])
    assert honest == []
    unique_ids = np.arange(n, dtype=np.int32)[:, None]  # every value pure because seen once: no warning
    assert label_copy_warnings(dense[:, :1], unique_ids, {"click": click}, ["I1"], ["row_id"]) == []
