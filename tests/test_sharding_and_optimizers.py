"""Placement and optimizers from config: per-table planner constraints (printed plan), per-table fused optimizers,
a memory budget, the learning-rate schedule over every group, and dense gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.run import prepare_job
from torchrec_mtl.train.distributed import init_distributed
from torchrec_mtl.train.loop import train
from torchrec_mtl.train.optimizers import LearningRateSchedule, dense_optimizer
from conftest import ONE_PASS


def _prepare(small_log, *overrides):
    config = load_config(
        "configs/mmoe_synthetic.yaml",
        [f"data.dir={small_log}", "data.generate=null", *ONE_PASS, "model.text=null", "training.progress=false",
         "training.batch_size=256", *overrides],
    )  # fmt: skip
    return prepare_job(config, init_distributed())


def _local(value) -> torch.Tensor:
    return value.local_shards()[0].tensor if hasattr(value, "local_shards") else value


def test_tables_take_their_own_placement_and_optimizer_and_the_plan_is_printed(small_log, capsys):
    job = _prepare(
        small_log,
        "training.sharding_types=[table_wise]",
        "training.tables={C7: {sharding_types: [row_wise]}, 'C1,C2': {optimizer: adagrad, lr: 0.01}}",
        "training.print_plan=true",
    )
    plan = capsys.readouterr().out
    assert "sharded tables on 1 process(es): 1 row_wise, 7 table_wise\nrow_wise: t_C7; table_wise: t_C1, t_C2, t_C3" in plan
    rows = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in plan.splitlines() if "| fused" in line}
    assert rows == {**{f"t_C{i}": "table_wise" for i in (1, 2, 3, 4, 5, 6, 8)}, "t_C7": "row_wise"}
    state = job.sharded.fused_optimizer.state_dict()["state"]
    momentum = {key.split(".")[-2]: _local(value[f"{key.split('.')[-2]}.momentum1"]) for key, value in state.items()}
    # Adagrad keeps a sum of squares per weight, row-wise Adagrad one per row
    assert momentum["t_C1"].shape == (301, 16) and momentum["t_C2"].shape == (191, 16)
    assert momentum["t_C7"].shape == (4947,) and momentum["t_C3"].shape == (13,)
    assert sorted(round(group["lr"], 6) for group in job.optimizer.param_groups) == [0.002, 0.01, 0.05, 0.05]


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.memory_budget_gb=0.0000001", "training: no sharding plan within 0.00 GiB per rank"),
        ("training.tables={C1: {optimizer: adam, sharding_types: [row_wise]}}",
         r"training: table t_C1: optimizer 'adam' trains on CPU only in data_parallel tables .*\['row_wise'\]"),
    ],
)
def test_what_the_planner_or_fbgemm_cannot_do_is_a_config_error(small_log, override, message):
    with pytest.raises(ConfigError, match=message):
        _prepare(small_log, override)


def _optimizer_of(job, table: str):
    """The torch optimizer stepping ``table``'s weight outside backward (a data-parallel table's), with its key."""
    for _, part in job.optimizer.optimizers:
        for key in getattr(part, "params", {}):
            if key.endswith(f".{table}.weight"):
                return part._optimizer, key
    raise AssertionError(f"no optimizer outside backward holds {table}")


def test_data_parallel_tables_train_with_their_own_optimizer_and_adam_runs_on_cpu_there(small_log, capsys):
    job = _prepare(
        small_log,
        "training.tables={C1: {optimizer: adam, lr: 0.01}, C2: {sharding_types: [data_parallel]}}",
    )
    assert "2 data_parallel, 6 table_wise" in capsys.readouterr().out
    adam, adam_key = _optimizer_of(job, "t_C1")
    adagrad, _ = _optimizer_of(job, "t_C2")  # the default embedding optimizer, not the dense one
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 0.01 and adam.defaults["fused"]
    assert type(adagrad).__name__ == "RowWiseAdagrad" and adagrad.param_groups[0]["lr"] == 0.05
    dense_keys = [k for _, part in job.optimizer.optimizers for k in getattr(part, "params", {}) if "tower" in k]
    assert dense_keys and not any(".t_C" in k for k in dense_keys)
    table = dict(job.sharded.named_parameters())[adam_key]
    before = table.detach().clone()
    job.pipeline.progress(iter(job.loader("train")))  # one step
    moved, gradient = (table.detach() - before).abs(), table.grad.abs()
    # Adam's first step: lr * |g| / (|g| + eps), the learning rate wherever the gradient dwarfs eps; nothing elsewhere
    assert (moved[gradient == 0] == 0).all() and (gradient > 0).sum() >= 16
    assert torch.allclose(moved, 0.01 * gradient / (gradient + 1e-8), rtol=1e-3, atol=1e-7)


def test_a_table_option_for_a_feature_the_schema_lacks_names_the_key():
    with pytest.raises(ConfigError, match=r"training.tables.C99: 'C99' is not a categorical feature of .*allowed: C1"):
        load_config("configs/mmoe_synthetic.yaml", ["training.tables={C99: {lr: 0.1}}"])


def test_the_schedule_warms_up_then_decays_every_group_from_its_own_rate(small_log):
    assert [LearningRateSchedule.multiplier_at(s, 4, 20, "linear", 0.0) for s in (0, 3, 4, 12, 20)] == [
        0.25, 1.0, 1.0, 0.5, 0.0,
    ]  # fmt: skip
    assert LearningRateSchedule.multiplier_at(12, 4, 20, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert LearningRateSchedule.multiplier_at(100, 4, 20, "constant", 0.0) == 1.0
    job = _prepare(small_log, "training.warmup_steps=10", "training.lr_decay=cosine", "training.min_lr_ratio=0.1",
                   "training.curve_every=25")  # fmt: skip
    assert sorted(job.schedule.base_lrs) == pytest.approx([0.002, 0.05])  # dense, embedding tables
    ratios = [g["lr"] / b for g, b in zip(job.optimizer.param_groups, job.schedule.base_lrs)]
    assert ratios == pytest.approx([0.1, 0.1])  # the first step of a 10-step warmup
    summary = train(job.sharded, job.pipeline, job.loader("train"), 1, False, job.tasks.names, 25,
                    window_batches=5, schedule=job.schedule)  # fmt: skip
    scales = [point["lr_scale"] for point in summary.curve]
    assert scales == sorted(scales, reverse=True) and scales[0] < 1.0  # decaying after the warmup
    total = summary.steps  # the schedule ends at the last step with min_lr_ratio x each base rate
    assert job.schedule.multiplier(total) == pytest.approx(0.1)
    ratios = [g["lr"] / b for g, b in zip(job.optimizer.param_groups, job.schedule.base_lrs)]
    assert ratios == pytest.approx([job.schedule.multiplier(total)] * len(ratios))
    # the fused kernel reads the group's rate at its step
    def fused(optimizer):  # the per-kernel optimizers inside torchrec's combined ones
        inner = getattr(optimizer, "optimizers", None)
        return [k for _, child in inner for k in fused(child)] if inner is not None else [optimizer]

    kernels = [part._emb_module for part in fused(job.sharded.fused_optimizer)]
    expected = 0.05 * job.schedule.multiplier(total - 1)  # the rate set before the last step
    assert kernels and all(k.get_learning_rate() == pytest.approx(expected, rel=1e-6) for k in kernels)


def test_dense_gradients_are_clipped_to_the_configured_norm():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    optimizer = dense_optimizer(dict(layer.named_parameters()), "sgd", lr=1.0, clip_norm=0.01)
    before = [p.detach().clone() for p in layer.parameters()]
    (layer(torch.randn(16, 8)) * 100).sum().backward()
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters())) > 1.0
    optimizer.step()
    step = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(layer.parameters(), before)))
    assert step == pytest.approx(0.01, rel=1e-4)  # SGD with lr 1 moves by the clipped gradient


def test_one_process_places_every_table_table_wise_and_says_why(small_log, capsys):
    _prepare(small_log, "training.print_plan=true")
    plan = capsys.readouterr().out
    assert "sharded tables on 1 process(es): 8 table_wise (one process: table-wise, nothing to split" in plan
    rows = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in plan.splitlines() if "| fused" in line}
    assert set(rows.values()) == {"table_wise"} and len(rows) == 8
