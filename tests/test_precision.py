"""training.precision (torchrec_mtl.precision): fp32 adds nothing, bf16/fp16 autocast the dense part only with the
losses in fp32, and under fp16 the fused embedding optimizers see true (unscaled) gradients, a step whose gradients
overflow is skipped for the dense part and changes no table."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

from esmm import EsmmObjective
from torchrec_mtl.build import build_model
from torchrec_mtl.config import JobConfig
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.model import MultiTaskTrain
from torchrec_mtl.precision import Precision, ScaledStep

FEATURES = [f"C{i}" for i in range(1, 5)]
CPU = torch.device("cpu")


def _batch(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    log = EncodedLog(
        rng.random((n, 13), dtype=np.float32),
        rng.integers(0, 500, (n, 4)).astype(np.int32),
        {"click": (rng.random(n) < 0.5).astype(np.float32), "conversion": (rng.random(n) < 0.2).astype(np.float32),
         "rating": rng.integers(1, 6, n).astype(np.float32)},
    )  # fmt: skip
    return next(iter(BatchLoader(log, FEATURES, n, shuffle=False)))


def _train(precision: Optional[Precision], steps: int) -> Dict[str, List[torch.Tensor]]:
    """The tables and one dense weight of a small sharded model before and after ``steps`` SGD steps (plain SGD on
    the tables: an update proportional to the gradient, so a scaled gradient would show), and the losses."""
    from torchrec_mtl.train.distributed import init_distributed, shard_model

    torch.manual_seed(0)
    model = build_model(JobConfig().model, 13, {f: 500 for f in FEATURES})
    train = MultiTaskTrain(model, EsmmObjective(rating_offset=3.0), precision)
    sharded, optimizer = shard_model(train, init_distributed(), "sgd", embedding_lr=0.5, dense_optimizer_name="sgd",
                                     dense_lr=0.1, sharding_types=["table_wise"])  # fmt: skip
    stepped = ScaledStep(optimizer, precision.scaler) if precision is not None and precision.scaler else optimizer

    def snapshot() -> List[torch.Tensor]:
        state = sharded.state_dict()
        tables = [state[k].local_shards()[0].tensor.clone() for k in sorted(state) if "embedding_bags" in k]
        return tables + [model.tower.experts.weights[0][0].detach().clone()]  # expert 0's first layer

    before, losses = snapshot(), []
    for step in range(steps):
        stepped.zero_grad()
        loss, (reported, _, _) = sharded(_batch(seed=step))
        loss.backward()
        stepped.step()
        losses.append(float(reported))
    return {"before": before, "after": snapshot(), "losses": losses, "sharded": sharded, "optimizer": optimizer}


def test_fp32_is_no_autocast_and_bf16_runs_the_dense_part_in_bf16_with_fp32_outputs():
    torch.manual_seed(0)
    model = build_model(JobConfig().model, 13, {f: 500 for f in FEATURES}, device=CPU)
    seen: Dict[str, torch.dtype] = {}
    model.tower.register_forward_hook(lambda m, i, o: seen.update(expert=m.experts(i[0]).dtype))
    model.tower.register_forward_hook(lambda m, i, o: seen.update(tower_out=o["ctr"].dtype))
    model.sparse_arch.register_forward_hook(lambda m, i, o: seen.update(lookup=o.dtype))
    batch = _batch()
    fp32 = model(batch.dense_features, batch.sparse_features)
    assert seen == {"expert": torch.float32, "tower_out": torch.float32, "lookup": torch.float32}
    assert Precision("fp32", CPU).autocast().__class__.__name__ == "nullcontext"
    model.use_precision(Precision("bf16", CPU))
    bf16 = model(batch.dense_features, batch.sparse_features)
    assert seen == {"expert": torch.bfloat16, "tower_out": torch.bfloat16, "lookup": torch.float32}
    assert all(value.dtype == torch.float32 for value in bf16.values()), "cast back for the objective"
    for task in fp32:
        assert not torch.equal(fp32[task], bf16[task]) and torch.allclose(fp32[task], bf16[task], atol=0.05)
    with pytest.raises(ValueError, match="'fp8'; allowed: fp32, bf16, fp16"):
        Precision("fp8", CPU)


def test_fp16_tables_train_with_true_gradients_and_an_overflowing_step_changes_nothing(tmp_path):
    """Three SGD steps: the tables and the dense weights move as under fp32 (to fp16's precision), not 1024 times
    further (the loss scale); with a scale so large that the gradients overflow, nothing moves and the scale falls.
    The scale goes into checkpoints, so a resumed fp16 run continues with it."""
    from torchrec_mtl.train.checkpoint import Checkpointer
    from torchrec_mtl.train.loop import TrainSummary
    from torchrec_mtl.train.resume import restore_run, save_run

    fp32 = _train(None, 3)
    precision = Precision("fp16", CPU, init_scale=2.0**10)
    fp16 = _train(precision, 3)
    assert precision.scaler.get_scale() == 2.0**10, "no step overflowed, so the scale did not move"
    np.testing.assert_allclose(fp16["losses"], fp32["losses"], rtol=5e-3)
    for b32, a32, b16, a16 in zip(fp32["before"], fp32["after"], fp16["before"], fp16["after"], strict=True):
        assert torch.equal(b32, b16), "the same initial weights"
        moved32, moved16 = a32 - b32, a16 - b16
        # measured: up to 3% of a table's update (its gradient went through fp16 interactions), 0.2% of the dense one
        assert moved32.norm() > 0 and float((moved16 - moved32).norm() / moved32.norm()) < 0.1

    overflow = Precision("fp16", CPU, init_scale=2.0**100)  # fp16 tops out near 2**16: every gradient overflows
    skipped = _train(overflow, 1)
    for before, after in zip(skipped["before"], skipped["after"], strict=True):
        assert torch.equal(before, after), "a skipped step: no dense step, zero gradients into the tables"
    assert overflow.scaler.get_scale() == 2.0**99 and np.isfinite(skipped["losses"]).all()

    path = save_run(Checkpointer(tmp_path), skipped["sharded"], skipped["optimizer"], TrainSummary(steps=1), None, 64,
                    {}, grad_scaler=overflow.scaler)  # fmt: skip
    resumed = Precision("fp16", CPU)
    restore_run(path, skipped["sharded"], skipped["optimizer"], 64, resumed.scaler)
    assert resumed.scaler.get_scale() == 2.0**99


def test_the_precision_is_a_checked_config_key():
    from torchrec_mtl.config import ConfigError, load_config

    assert load_config("configs/mmoe_synthetic.yaml").training.precision == "fp32"
    assert load_config("configs/mmoe_synthetic.yaml", ["training.precision=bf16"]).training.precision == "bf16"
    with pytest.raises(ConfigError, match=r"training.precision: 'fp8'; allowed: fp32, bf16, fp16"):
        load_config("configs/mmoe_synthetic.yaml", ["training.precision=fp8"])
