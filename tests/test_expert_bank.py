"""The expert bank: each expert computed as its own MLP would be, initialised as the per-expert layout was, the gates
fused into its first layer giving what separate gates give, and state dicts and DCP checkpoints of the per-expert
layout loading into it (a resumed run refused, naming what can load it)."""

from __future__ import annotations

import doctest
from typing import Dict

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.modules.mlp import MLP

from per_expert_towers import PerExpertMMoE, PerExpertPLE
from torchrec_mtl.modules import expert_bank
from torchrec_mtl.modules.expert_bank import ExpertBank
from torchrec_mtl.modules.towers import CGC, PLE, MMoE
from torchrec_mtl.train.checkpoint import CheckpointError, load_tensors

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


def test_the_exported_tower_scores_bit_for_bit_as_the_eager_one():
    """The export traces with FX and scripts (torchrec_mtl.inference.export); TorchScript decomposes addmm into
    mm + add, which rounds otherwise, so the bank's first layer is a linear: serve.pt then scores as predict does."""
    import torchrec.fx

    class Scored(nn.Module):  # the export's entry point: a plain tensor in
        def __init__(self, tower: nn.Module) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
            return self.tower(features)

    # the types themselves, not this file's postponed strings: FX writes them into the code TorchScript compiles
    Scored.forward.__annotations__ = {"features": torch.Tensor, "return": Dict[str, torch.Tensor]}
    torch.manual_seed(0)
    x = torch.randn(512, 300)  # wide enough that the product is summed in blocks: mm + add then rounds otherwise
    for tower in (MMoE(300, TASKS, **MMOE), PLE(300, TASKS, **PLE_2)):
        model = Scored(tower).eval().requires_grad_(False)
        scripted = torch.jit.script(torchrec.fx.symbolic_trace(model))
        with torch.no_grad():
            eager, exported = model(x), scripted(x)
        for task in TASKS:
            assert torch.equal(eager[task], exported[task]), (type(tower).__name__, task)


class _Model(nn.Module):
    """What a checkpoint's model state is the state of, here: a tower under ``tower``."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower


def _model_state(model: nn.Module) -> dict:
    return {f"model.{key}": value for key, value in model.state_dict().items()}  # as inference.load_trained has it


@pytest.mark.parametrize("old_class, new_class, sizes", PAIRS[:2])
def test_a_dcp_checkpoint_of_the_per_expert_layout_loads_its_weights_and_refuses_a_resume(
    tmp_path, old_class, new_class, sizes
):
    torch.manual_seed(0)
    old = _Model(old_class(10, TASKS, **sizes))
    dcp.save({"model": _model_state(old)}, checkpoint_id=str(tmp_path), no_dist=True)
    torch.manual_seed(1)
    new = _Model(new_class(10, TASKS, **sizes))
    state = {"model": _model_state(new)}
    load_tensors(tmp_path, state, no_dist=True, verify=False, module=new)
    assert state["model"].keys() == _model_state(new).keys()  # the caller's state keeps its keys, filled
    x = torch.randn(32, 10)
    _close(old.tower.eval()(x), new.tower.eval()(x))
    _close(old.tower.gate_weights(x), new.tower.gate_weights(x))
    resume = {"model": _model_state(new), "optimizer": {"state": {}}}
    with pytest.raises(CheckpointError, match="written before the expert banks .* a run cannot resume from it"):
        load_tensors(tmp_path, resume, no_dist=True, verify=False, module=new)
    with pytest.raises(CheckpointError, match="written before the expert banks"):
        load_tensors(tmp_path, {"model": _model_state(new)}, no_dist=True, verify=False)  # no module to map with
    # a checkpoint of the banks loads as ever
    dcp.save({"model": _model_state(new)}, checkpoint_id=str(tmp_path / "new"), no_dist=True)
    again = _Model(new_class(10, TASKS, **sizes))
    load_tensors(tmp_path / "new", {"model": _model_state(again)}, no_dist=True, verify=False)
    _close(again.tower.eval()(x), new.tower(x))


def test_a_sharded_model_loads_a_per_expert_checkpoint_to_fine_tune_but_not_to_resume(tmp_path):
    """Through DistributedModelParallel (world size 1; the tower is data-parallel) and the run's checkpoint code."""
    from esmm import EsmmObjective
    from torchrec_mtl.build import build_model
    from torchrec_mtl.config import JobConfig
    from torchrec_mtl.model import MultiTaskTrain
    from torchrec_mtl.train.checkpoint import Checkpointer
    from torchrec_mtl.train.distributed import init_distributed, shard_model
    from torchrec_mtl.train.resume import load_model_state, restore_run

    env, config = init_distributed(), JobConfig().model
    tables = {f"C{i}": 100 for i in range(1, 5)}

    def sharded(per_expert: bool):
        torch.manual_seed(0)
        model = build_model(config, 13, tables)
        if per_expert:  # the tower as it was, with other weights
            tower, spec = model.tower, config.tower
            torch.manual_seed(1)
            model.tower = PerExpertMMoE(tower.experts.in_features, tower.task_names, spec.num_experts,
                                        spec.expert_layer_sizes, spec.tower_layer_sizes)  # fmt: skip
        return (model, *shard_model(MultiTaskTrain(model, EsmmObjective(rating_offset=3.0)), env))

    old, old_sharded, _ = sharded(per_expert=True)
    path = Checkpointer(tmp_path).save(1, {"model": old_sharded.state_dict()}, {})
    new, new_sharded, optimizer = sharded(per_expert=False)
    assert not torch.equal(new.tower.experts.weights[0][0], old.tower.experts[0]._mlp[0]._linear.weight)
    load_model_state(path, new_sharded)  # what fine-tuning calls
    for layer in range(len(config.tower.expert_layer_sizes)):
        for e, expert in enumerate(old.tower.experts):
            linear = expert._mlp[layer]._linear
            assert torch.equal(new.tower.experts.weights[layer][e], linear.weight)
            assert torch.equal(new.tower.experts.biases[layer][e], linear.bias)
    assert torch.equal(new.tower.gates["ctr"].weight, old.tower.gates["ctr"].weight)
    with pytest.raises(CheckpointError, match="a run cannot resume from it .* start a new run, or fine-tune from it"):
        restore_run(path, new_sharded, optimizer, 64)
