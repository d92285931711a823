"""The multi-task towers: one [B] logit per task, seeded builds, experts that start different, who shares what."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch
from torch import nn

from torchrec_mtl.modules import towers
from torchrec_mtl.modules.tower_parts import Gate
from torchrec_mtl.modules.towers import CGC, PLE, TOWERS, MMoE, SharedBottom, SingleTask

TASKS = ["ctr", "cvr", "rating"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These modules are tiny: a second intra-op thread only fights for the cores (a training step goes 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(kind: str, in_features: int, task_names=TASKS) -> nn.Module:
    """A small tower of each kind (heads wide enough that none starts dead); PLE with two levels, so a shared gate."""
    if kind == "shared_bottom":
        return SharedBottom(in_features, task_names, bottom_layer_sizes=[8, 4], tower_layer_sizes=[8])
    if kind == "mmoe":
        return MMoE(in_features, task_names, num_experts=3, expert_layer_sizes=[8, 4], tower_layer_sizes=[8])
    if kind == "ple":
        return PLE(in_features, task_names, 2, 2, 1, expert_layer_sizes=[8, 4], tower_layer_sizes=[8])
    if kind == "cgc":
        return CGC(in_features, task_names, 2, 1, expert_layer_sizes=[8, 4], tower_layer_sizes=[8])
    return TOWERS[kind](in_features, task_names, expert_layer_sizes=[8, 4], tower_layer_sizes=[8])


KINDS = [*TOWERS, "cgc"]


def _num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _touched(tower: nn.Module, output: torch.Tensor) -> set[str]:
    """Names of the parameters that get a non-zero gradient from ``output``."""
    names, params = zip(*tower.named_parameters())
    grads = torch.autograd.grad(output, params, allow_unused=True, retain_graph=True)
    return {name for name, grad in zip(names, grads) if grad is not None and grad.abs().sum() > 0}


def _all_different(outputs: list[torch.Tensor]) -> None:
    for (i, a), (j, b) in itertools.combinations(enumerate(outputs), 2):
        assert not torch.allclose(a, b), f"experts {i} and {j} give the same output"


def test_registry_names_every_tower():
    assert TOWERS == {"single_task": SingleTask, "shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}
    assert issubclass(CGC, PLE)


@pytest.mark.parametrize("in_features", [1, 5, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_every_tower_gives_one_logit_per_task(kind, in_features):
    torch.manual_seed(0)
    logits = _build(kind, in_features)(torch.randn(6, in_features))
    assert list(logits) == TASKS, "one logit per task, in task_names order"
    for name, logit in logits.items():
        assert logit.shape == (6,), name
        assert torch.isfinite(logit).all(), name


@pytest.mark.parametrize("kind", KINDS)
def test_a_keyed_tensor_regrouped_by_torchrec_feeds_every_tower(kind):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.modules.regroup import KTRegroupAsDict
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=10, feature_names=[f]) for f in "uvw"]
    ebc = EmbeddingBagCollection(tables=tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(list("uvw"), torch.arange(12) % 10, torch.ones(12, dtype=torch.int32))
    embedded = ebc(kjt)  # a KeyedTensor of 3 features x 4 dims, 4 rows
    tower = _build(kind, 12)
    direct = tower(embedded)
    assert torch.equal(torch.stack(list(direct.values())), torch.stack(list(tower(embedded.values()).values())))
    # torchrec's KTRegroupAsDict picks and orders the features of the tower's input group
    group = KTRegroupAsDict(groups=[["w", "u", "v"]], keys=["tower_input"])([embedded])["tower_input"]
    regrouped = tower(group)
    assert list(regrouped) == TASKS and regrouped["ctr"].shape == (4,)
    reordered = torch.cat([embedded["w"], embedded["u"], embedded["v"]], dim=1)
    assert torch.equal(regrouped["ctr"], tower(reordered)["ctr"])
    if hasattr(tower, "gate_weights"):
        assert all(
            torch.equal(a, b)
            for a, b in zip(tower.gate_weights(embedded).values(), tower.gate_weights(embedded.values()).values())
        )


@pytest.mark.parametrize("kind", KINDS)
def test_a_seed_fixes_the_build(kind):
    x = torch.randn(4, 5)
    builds = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        builds.append(_build(kind, 5))
    same, again, other = builds
    for (name, a), (_, b), (_, c) in zip(
        same.state_dict().items(), again.state_dict().items(), other.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(same.state_dict().values(), other.state_dict().values()))
    for name, logit in same(x).items():
        torch.testing.assert_close(logit, again(x)[name], rtol=0, atol=0)


def test_mmoe_experts_start_different():
    torch.manual_seed(0)
    tower = MMoE(5, TASKS, num_experts=4, expert_layer_sizes=[8, 4])
    x = torch.randn(16, 5)
    _all_different(list(tower.experts(x)))


def test_ple_experts_start_different():
    torch.manual_seed(0)
    tower = PLE(5, TASKS, num_levels=2, num_shared_experts=2, num_task_experts=2, expert_layer_sizes=[8, 4])
    for level, width in zip(tower.levels, (5, 4)):
        x = torch.randn(16, width)
        outputs = [*level.task_experts(x), *level.shared_experts(x)]
        assert len(outputs) == len(TASKS) * 2 + 2
        _all_different(outputs)


def test_single_task_shares_nothing_and_shared_bottom_does():
    torch.manual_seed(0)
    x = torch.randn(16, 5)
    single = _build("single_task", 5)
    touched = {name: _touched(single, logit.sum()) for name, logit in single(x).items()}
    for a, b in itertools.combinations(TASKS, 2):
        assert not touched[a] & touched[b], f"{a} and {b} share {touched[a] & touched[b]}"
    for name in TASKS:
        assert touched[name], name
        assert all(p.startswith((f"bottoms.{name}.", f"heads.heads.{name}.")) for p in touched[name]), name
    assert set().union(*touched.values()) == {name for name, _ in single.named_parameters()}

    shared = _build("shared_bottom", 5)
    bottom = {f"bottom.{name}" for name, _ in shared.bottom.named_parameters()}
    for name, logit in shared(x).items():
        assert bottom <= _touched(shared, logit.sum()), f"{name} does not train the shared bottom"


def _small_ple(num_levels: int) -> PLE:
    return PLE(
        8,
        ["a", "b"],
        num_levels,
        num_shared_experts=1,
        num_task_experts=1,
        expert_layer_sizes=[4],
        tower_layer_sizes=[3],
    )


def test_ple_parameter_count_matches_a_hand_count():
    # level 1: 3 experts Linear(8, 4) = 3 * 36, 2 task gates Linear(8, 1 + 1) = 2 * 18, shared gate Linear(8, 3) = 27
    level_1 = 3 * (8 * 4 + 4) + 2 * (8 * 2 + 2) + (8 * 3 + 3)
    # level 2 (the last): 3 experts Linear(4, 4) = 3 * 20, 2 task gates Linear(4, 2) = 2 * 10, no shared gate
    level_2 = 3 * (4 * 4 + 4) + 2 * (4 * 2 + 2)
    # heads: Linear(4, 3) then Linear(3, 1), per task
    heads = 2 * ((4 * 3 + 3) + (3 + 1))
    assert (level_1, level_2, heads) == (171, 80, 38)
    torch.manual_seed(0)
    two = _small_ple(2)
    assert _num_parameters(two) == 289
    assert two.levels[0].shared_gate.out_features == 3 and two.levels[1].shared_gate is None
    # one level is CGC: level 1 without its shared gate, then the heads
    assert _num_parameters(_small_ple(1)) == _num_parameters(CGC(8, ["a", "b"], 1, 1, [4], [3])) == 144 + 38


def _experts_touched(tower: nn.Module, output: torch.Tensor, bank: str) -> list[bool]:
    """Per expert of the ExpertBank ``bank`` (its name in ``tower``): whether ``output`` gives its weights a non-zero
    gradient (the bank's experts are slices of one parameter)."""
    weights = tower.get_submodule(bank).weights[0]
    (grad,) = torch.autograd.grad(output, [weights], retain_graph=True)
    return [bool(expert.abs().sum() > 0) for expert in grad]


def test_ple_task_experts_of_the_last_level_serve_their_task_only():
    torch.manual_seed(0)
    tower = _small_ple(2)
    logits = tower(torch.randn(32, 8))
    touched_by_b = _touched(tower, logits["b"].sum())
    assert not any(p.startswith("levels.1.task_gates.a.") for p in touched_by_b)
    # one task expert each, a's then b's
    assert _experts_touched(tower, logits["b"].sum(), "levels.1.task_experts") == [False, True]
    assert _experts_touched(tower, logits["a"].sum(), "levels.1.task_experts") == [True, False]
    assert {"levels.1.shared_experts.weights.0", "levels.0.shared_experts.weights.0"} <= touched_by_b
    # the level below the last mixes every expert into the next shared experts: a's experts there do help b
    assert _experts_touched(tower, logits["b"].sum(), "levels.0.task_experts") == [True, True]
    assert "levels.0.shared_gate.weight" in touched_by_b


@pytest.mark.parametrize("num_levels", [1, 3])
def test_gate_weights_are_softmax_rows_of_the_last_level(num_levels):
    torch.manual_seed(0)
    x = torch.randn(10, 5)
    ple = PLE(5, TASKS, num_levels, num_shared_experts=2, num_task_experts=3, expert_layer_sizes=[8, 4])
    mmoe = MMoE(5, TASKS, num_experts=4, expert_layer_sizes=[8, 4])
    for tower, width in ((ple, 3 + 2), (mmoe, 4)):
        weights = tower.gate_weights(x)
        assert list(weights) == TASKS
        for name, w in weights.items():
            assert w.shape == (10, width), name
            assert (w >= 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(10))
    # at one level they are exactly the task gates' softmax, the weights forward mixes the experts with
    if num_levels == 1:
        for name, w in ple.gate_weights(x).items():
            gate = ple.levels[0].task_gates[name]
            torch.testing.assert_close(w, torch.softmax(nn.functional.linear(x, gate.weight, gate.bias), dim=-1))


def test_two_level_ple_has_more_parameters_and_trains():
    torch.manual_seed(0)
    assert _num_parameters(_small_ple(2)) > _num_parameters(_small_ple(1))
    x = torch.randn(256, 4)
    labels = {"y1": (x[:, 0] > 0).float(), "y2": (x[:, 1] > 0).float()}
    tower = PLE(4, ["y1", "y2"], num_levels=2, num_shared_experts=1, num_task_experts=1, expert_layer_sizes=[8])
    optimizer = torch.optim.Adam(tower.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        logits = tower(x)
        return sum(nn.functional.binary_cross_entropy_with_logits(logits[n], labels[n]) for n in labels)

    before = loss().item()
    for _ in range(40):
        optimizer.zero_grad()
        step = loss()
        step.backward()
        optimizer.step()
    after = loss().item()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: PLE(8, []), "task_names"),
        (lambda: PLE(8, ["a"], num_levels=0), "num_levels"),
        (lambda: PLE(8, ["a"], num_shared_experts=0), "num_shared_experts"),
        (lambda: PLE(8, ["a"], num_task_experts=0), "num_task_experts"),
        (lambda: PLE(8, ["a"], expert_layer_sizes=[]), "expert_layer_sizes"),
        (lambda: PLE(0, ["a"]), "in_features"),
        (lambda: CGC(8, ["a"], num_shared_experts=0), "num_shared_experts"),
        (lambda: MMoE(8, ["a"], num_experts=0), "num_experts"),
        (lambda: MMoE(8, []), "task_names"),
        (lambda: SingleTask(8, []), "task_names"),
        (lambda: SingleTask(8, ["a", "a"]), "task_names"),
        (lambda: SingleTask(8, ["a"], tower_layer_sizes=[4, 0]), "tower_layer_sizes"),
        (lambda: SharedBottom(8, ["a"], bottom_layer_sizes=[]), "bottom_layer_sizes"),
    ],
)
def test_invalid_arguments_are_refused_by_name(build, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        build()


def test_a_single_string_is_not_a_task_list():
    with pytest.raises(TypeError, match="^task_names: "):
        PLE(8, "ctr")


def test_module_docstring_example_runs():
    result = doctest.testmod(towers)
    assert result.attempted > 0 and result.failed == 0


def test_a_gate_at_temperature_1_without_expert_dropout_is_the_softmax_of_a_linear_with_its_names():
    torch.manual_seed(0)
    gate, x = Gate(6, 4), torch.randn(32, 6)
    plain = nn.Linear(6, 4)
    plain.load_state_dict(gate.state_dict())
    assert torch.equal(gate(x, drop_experts=True), torch.softmax(plain(x), dim=-1))
    tower = MMoE(6, ["ctr", "cvr"], num_experts=3, expert_layer_sizes=[5], gate_temperature=2.0, expert_dropout=0.2)
    assert {"gates.ctr.weight", "gates.ctr.bias"} <= set(tower.state_dict())  # the names a plain Linear gate had
    flat = Gate(6, 4, temperature=4.0)
    flat.load_state_dict(gate.state_dict())
    assert torch.allclose(flat(x), torch.softmax(plain(x) / 4.0, dim=-1))
    entropy = lambda w: -(w * w.log()).sum(dim=-1).mean()  # noqa: E731
    assert entropy(flat(x)) > entropy(gate(x))


def test_expert_dropout_leaves_experts_out_of_rows_in_training_only_and_never_all_of_them():
    torch.manual_seed(0)
    gate, x = Gate(6, 4, expert_dropout=0.6), torch.randn(20_000, 6)
    weights = gate(x, drop_experts=True)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(len(x)))
    assert bool((weights > 0).any(dim=-1).all())  # a row that drew all four out keeps them all
    left_out = (weights == 0).float().mean().item()
    # each expert out with p = 0.6, except the rows that would lose all four (0.6^4 of them) keep all
    assert left_out == pytest.approx(0.6 - 0.6**4, abs=0.01)
    assert torch.equal(gate(x), gate(x, drop_experts=False)) and bool((gate(x) > 0).all())
    tower = MMoE(6, ["ctr"], num_experts=4, expert_layer_sizes=[5], expert_dropout=0.6)
    tower.eval()
    assert torch.equal(tower(x[:64])["ctr"], tower(x[:64])["ctr"])  # no dropout in evaluation
    ple = PLE(6, ["ctr", "cvr"], num_levels=2, num_shared_experts=1, num_task_experts=2, expert_layer_sizes=[5],
              expert_dropout=0.6)  # fmt: skip
    ple.train()
    state = torch.get_rng_state()
    ple.gate_weights(x[:64])  # the diagnostics' view: no dropout, and no random draw
    assert torch.equal(torch.get_rng_state(), state)
    first, second = ple(x[:64])["ctr"], ple(x[:64])["ctr"]
    assert not torch.equal(first, second)  # in training every level's gates drop experts at random
