"""Pruning at export, its parts (torchrec_mtl.pruning): which rows go, the remap that sends their IDs to row 0 once
traced and scripted as export does, magnitude pruning that leaves plain weights, and the options' checks. The export
of a trained run, loaded without this package, is tests/test_pruning_export.py."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torchrec.fx
from torch import nn

from torchrec_mtl import pruning
from torchrec_mtl.cli_args import build_parser
from torchrec_mtl.modules.towers import MMoE
from torchrec_mtl.pruning import Pruning, RowRemap, choose_rows, prune_dense


def test_the_module_examples_hold():
    assert doctest.testmod(pruning, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_across_all_tables_the_least_used_rows_go_and_small_busy_tables_keep_theirs():
    scores = {"big": np.array([50, 1, 2, 3, 4, 5, 6, 7, 8, 9]), "small": np.array([100, 90, 80])}
    kept = choose_rows(scores, 0.5)  # 6 of the 13 rows: the six lowest counts, all in the big table
    assert kept["big"].tolist() == [0, 7, 8, 9] and kept["small"].tolist() == [0, 1, 2]
    per_table = choose_rows(scores, 0.5, "table")  # 5 of 10 and 1 of 3
    assert per_table["big"].tolist() == [0, 6, 7, 8, 9] and per_table["small"].tolist() == [0, 1]


@pytest.mark.parametrize("scope", ["all", "table"])
def test_row_0_stays_whatever_its_score_ties_go_by_row_and_a_share_near_1_leaves_row_0_alone(scope):
    scores = {"a": np.array([0.0, 3.0, 3.0, 3.0, 3.0])}
    assert choose_rows(scores, 0.4, scope)["a"].tolist() == [0, 3, 4]  # two of the tied rows: the lower numbers
    assert choose_rows(scores, 0.99, scope)["a"].tolist() == [0]
    assert choose_rows(scores, 0.0, scope)["a"].tolist() == [0, 1, 2, 3, 4]
    assert choose_rows({"a": np.arange(100)}, 0.57, scope)["a"].size == 43  # 57 rows, not 56.99999999999999
    with pytest.raises(ValueError, match="scope"):
        choose_rows(scores, 0.5, "everything")


def _traced_and_scripted(module: nn.Module) -> torch.jit.ScriptModule:
    """As export makes model.pt: torchrec's FX trace, then TorchScript."""
    return torch.jit.script(torchrec.fx.symbolic_trace(module))


def test_the_remap_sends_kept_rows_to_their_new_place_and_every_other_id_to_row_0_once_scripted():
    kept = {0: np.array([0, 2, 5, 9]), 2: np.array([0, 1])}
    remap = _traced_and_scripted(RowRemap(3, kept))
    ids = torch.tensor([[0, 7, 0], [2, 8, 1], [5, 9, 2], [9, 10, 3], [3, 11, 1], [2**40, 12, 2**31 + 1]])
    expected = torch.tensor([[0, 7, 0], [1, 8, 1], [2, 9, 0], [3, 10, 0], [0, 11, 1], [0, 12, 0]])
    assert torch.equal(remap(ids), expected)  # column 1 is not pruned: its ids pass through
    assert remap(ids).dtype == torch.int64 and remap(ids[:0]).shape == (0, 3)
    # the trace keeps each table's kept rows as a constant: 6 row numbers in all, int32 (half the bytes of int64)
    stored = [buffer for _, buffer in remap.named_buffers()]
    assert sum(b.numel() for b in stored) == 6 and {b.dtype for b in stored} == {torch.int32}
    huge = RowRemap(1, {0: np.array([0, 2**33])})  # a table past int32 rows keeps int64 row numbers
    assert huge(torch.tensor([[2**33], [2**33 + 1]])).tolist() == [[1], [0]] and huge.kept_rows.dtype == torch.int64
    with pytest.raises(ValueError, match="row 0"):
        RowRemap(1, {0: np.array([1, 2])})


def test_dense_pruning_zeroes_the_share_of_each_tower_layer_by_magnitude_and_leaves_plain_weights():
    torch.manual_seed(0)
    tower = MMoE(12, ["ctr", "cvr"], num_experts=2, expert_layer_sizes=[8, 4], tower_layer_sizes=[4])
    before = {name: p.detach().clone() for name, p in tower.named_parameters()}
    report = prune_dense(tower, 0.5)
    # every linear layer, as (name, weight, bias, weight before, bias before): the gates' and heads' nn.Linear, and
    # each expert's layer, a slice of the expert bank's stacked weights, pruned on its own as its nn.Linear was
    linear = {name: m for name, m in tower.named_modules() if isinstance(m, nn.Linear)}
    layers = [(name, m.weight, m.bias, before[f"{name}.weight"], before[f"{name}.bias"]) for name, m in linear.items()]
    for layer in range(2):
        for expert in range(2):
            weight, bias = tower.experts.weights[layer][expert], tower.experts.biases[layer][expert]
            old_weight = before[f"experts.weights.{layer}"][expert]
            old_bias = before[f"experts.biases.{layer}"][expert]
            layers.append((f"expert {expert} layer {layer}", weight, bias, old_weight, old_bias))
    assert report["layers"] == len(layers) == 2 * 2 + 2 + 2 * 2  # expert layers, gates, head layers
    for name, weight, bias, old, old_bias in layers:
        weight = weight.detach()
        zeroed = weight == 0
        assert int(zeroed.sum()) == round(0.5 * weight.numel()), name
        assert old.abs()[zeroed].max() <= old.abs()[~zeroed].min(), name  # the smallest magnitudes went
        assert torch.equal(weight[~zeroed], old[~zeroed]) and torch.equal(bias, old_bias)
    assert not any(m._forward_pre_hooks for m in linear.values())  # no pruning hook left behind
    assert sorted(tower.state_dict()) == sorted(before)  # no weight_orig, no weight_mask
    assert report["zeros"] == sum(round(0.5 * layer[1].numel()) for layer in layers)


def test_the_options_are_checked_and_pruning_is_off_by_default():
    assert not Pruning().active and Pruning(dense=0.1).active
    for bad in (dict(rows=1.0), dict(rows=-0.1), dict(dense=float("nan")), dict(by="size"), dict(scope="x")):
        with pytest.raises(ValueError):
            Pruning(**bad)
    parser = build_parser()
    args = parser.parse_args(["export", "--checkpoint", "c", "--out", "o"])
    assert (args.prune_rows, args.prune_by, args.prune_scope, args.prune_dense) == (0.0, "count", "all", 0.0)
    args = parser.parse_args(["export", "--checkpoint", "c", "--out", "o", "--prune-rows", "0.9", "--prune-by",
                              "norm", "--prune-scope", "table", "--prune-dense", "0.5", "--quantize"])  # fmt: skip
    assert (args.prune_rows, args.prune_by, args.prune_scope, args.prune_dense) == (0.9, "norm", "table", 0.5)
    for bad in (["--prune-rows", "1"], ["--prune-dense", "-0.5"], ["--prune-by", "size"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["export", "--checkpoint", "c", "--out", "o", *bad])
        assert exit_.value.code == 2
