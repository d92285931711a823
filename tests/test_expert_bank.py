"""The expert bank: each expert computed as its own MLP would be, initialised as the per-expert layout was, the gates
fused into its first layer giving what separate gates give, and state dicts of the per-expert layout loading into
it."""

from __future__ import annotations

import doctest

import pytest
import torch
from torchrec.modules.mlp import MLP

from per_expert_towers import PerExpertMMoE, PerExpertPLE
from torchrec_mtl.modules import expert_bank
from torchrec_mtl.modules.expert_bank import ExpertBank
from torchrec_mtl.modules.towers import CGC, PLE, MMoE

TASKS = ["ctr", "cvr", "rating"]
MMOE = dict(num_experts=3, expert_layer_sizes=[8, 6], tower_layer_sizes=[5])
PLE_2 = dict(num_levels=2, num_shared_experts=2, num_task_experts=2, expert_layer_sizes=[8, 6], tower_layer_sizes=[5])
PLE_3 = dict(num_levels=3, num_shared_experts=1, num_task_experts=3, expert_layer_sizes=[7], tower_layer_sizes=[])
PAIRS = [(PerExpertMMoE, MMoE, MMOE), (PerExpertPLE, PLE, PLE_2), (PerExpertPLE, PLE, PLE_3)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny modules: a second intra-op thread only fights for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_the_module_example_holds():
    result = doctest.testmod(expert_bank, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_each_expert_is_its_own_mlp_over_a_shared_input_and_over_its_groups_input():
    torch.manual_seed(0)
    bank = ExpertBank(6, 5, [8, 4, 3])
    mlps = []
    for e in range(6):
        mlp = MLP(5, [8, 4, 3])
        for layer, perceptron in enumerate(mlp._mlp):
            perceptron._linear.load_state_dict({"weight": bank.weights[layer][e], "bias": bank.biases[layer][e]})
        mlps.append(mlp)
    x = torch.randn(16, 5, requires_grad=True)
    out = bank(x)
    assert out.shape == (6, 16, 3)
    for e, mlp in enumerate(mlps):
        torch.testing.assert_close(out[e], mlp(x), rtol=0, atol=1e-6)
    grouped = torch.randn(3, 16, 5)  # 3 groups of 2 experts, each group its own input
    out = bank.forward_grouped(grouped)
    for e, mlp in enumerate(mlps):
        torch.testing.assert_close(out[e], mlp(grouped[e // 2]), rtol=0, atol=1e-6)
    # the gradient of each expert's slice is its own MLP's
    bank(x)[4].sum().backward()
    mlps[4](x).sum().backward()
    torch.testing.assert_close(bank.weights[0].grad[4], mlps[4]._mlp[0]._linear.weight.grad, rtol=0, atol=1e-5)
    assert bank.weights[0].grad[[0, 1, 2, 3, 5]].abs().sum() == 0


@pytest.mark.parametrize("old_class, new_class, sizes", PAIRS)
def test_a_seeded_build_holds_the_numbers_the_per_expert_layout_held(old_class, new_class, sizes):
    """The bank draws each expert's Linears in the old order: a seed gives the very weights it gave before, so
    training starts where it did (and the RNG is left where it was left)."""
    torch.manual_seed(3)
    old = old_class(10, TASKS, **sizes)
    after_old = torch.rand(1)
    torch.manual_seed(3)
    new = new_class(10, TASKS, **sizes)
    assert torch.equal(torch.rand(1), after_old)
    stacked = new_class(10, TASKS, **sizes)
    stacked.load_state_dict(old.state_dict())
    assert stacked.state_dict().keys() == new.state_dict().keys()
    for key, value in new.state_dict().items():
        assert torch.equal(value, stacked.state_dict()[key]), key


@pytest.mark.parametrize("old_class, new_class, sizes", PAIRS)
def test_a_per_expert_state_dict_loads_and_gives_the_same_outputs_and_gate_weights(old_class, new_class, sizes):
    torch.manual_seed(0)
    old = old_class(10, TASKS, **sizes)
    torch.manual_seed(1)  # other weights, so that a load that did nothing would show
    new = new_class(10, TASKS, **sizes)
    assert new.load_state_dict(old.state_dict()) is not None  # strict: no key missing or left over
    x = torch.randn(64, 10)
    for mode in (False, True):  # without expert dropout, training's forward is evaluation's
        old.train(mode), new.train(mode)
        _close(old(x), new(x))
        _close(old.gate_weights(x), new.gate_weights(x))


def test_cgc_loads_per_expert_state_dicts_too():
    torch.manual_seed(0)
    old = PerExpertPLE(10, TASKS, num_levels=1, num_shared_experts=2, num_task_experts=1, expert_layer_sizes=[4])
    new = CGC(10, TASKS, num_shared_experts=2, num_task_experts=1, expert_layer_sizes=[4])
    new.load_state_dict(old.state_dict())
    x = torch.randn(8, 10)
    _close(old(x), new(x))


def test_a_per_expert_state_dict_missing_an_expert_is_refused_naming_the_bank():
    old_state = PerExpertMMoE(10, TASKS, **MMOE).state_dict()
    del old_state["experts.2._mlp.1._linear.bias"]
    with pytest.raises(RuntimeError, match=r"experts: a state dict of the per-expert layout lacks some experts' "
                                           r"layers \(has 11 of 12 tensors\)"):  # fmt: skip
        MMoE(10, TASKS, **MMOE).load_state_dict(old_state)


def test_the_gates_in_the_first_layers_product_give_what_separate_gates_give():
    torch.manual_seed(0)
    tower = MMoE(10, TASKS, **MMOE, gate_temperature=2.0, expert_dropout=0.3)
    x = torch.randn(64, 10)
    results = {}
    for fused in (True, False):
        tower.fuse_gates = fused
        tower.zero_grad()
        torch.manual_seed(5)  # the same expert dropout draws, in the same order
        logits = tower.train()(x)
        sum(logit.sum() for logit in logits.values()).backward()
        results[fused] = (logits, {name: p.grad.clone() for name, p in tower.named_parameters()})
    _close(results[True][0], results[False][0])
    _close(results[True][1], results[False][1], atol=1e-5)
    assert tower.fuse_gates is False and MMoE(10, TASKS).fuse_gates is True  # fused by default

