"""Worker functions for multi-process tests; spawned processes import them from here by name."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_mtl.config import JobConfig, DataConfig
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.job import build_model, load_data
from torchrec_mtl.model import MultiTaskTrain
from torchrec_mtl.tasks import EVALUATED_TASKS, EsmmObjective
from torchrec_mtl.train.distributed import init_distributed, load_full_state, shard_model
from torchrec_mtl.train.loop import evaluate, make_eval_pipeline, make_pipeline, train


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)


def sharded_matches_unsharded(rank: int, world_size: int, port: int, log_dir: str, sharding_type: str) -> None:
    """Same weights: the sharded model's predictions and its evaluation over both ranks equal the unsharded model's;
    then it trains."""
    _join(rank, world_size, port)
    env = init_distributed()
    config = JobConfig(data=DataConfig(dir=log_dir))
    log = load_data(config, env)
    features, train_shards, test_log = log.categorical_features, log.split("train"), log.split("test")
    torch.manual_seed(0)
    model = build_model(config.model, len(log.dense_features), log.table_sizes, device=torch.device("cpu"))
    unsharded = MultiTaskTrain(copy.deepcopy(model), EsmmObjective(rating_offset=3.0))
    sharded, optimizer = shard_model(
        MultiTaskTrain(model, EsmmObjective(rating_offset=3.0)), env, sharding_types=[sharding_type]
    )
    placed = {
        parameter_sharding.sharding_type
        for module_plan in sharded.plan.plan.values()
        for parameter_sharding in module_plan.values()
    }
    assert placed == {sharding_type}, f"plan used {placed}, asked for {sharding_type}"
    load_full_state(sharded, unsharded.state_dict())

    loader = BatchLoader(train_shards, features, 128, rank, world_size, shuffle=False)
    batch = next(iter(loader))
    sharded.eval()
    unsharded.eval()
    with torch.no_grad():
        sharded_loss, (_, sharded_predictions, _) = sharded(batch)
        full_loss, (_, full_predictions, _) = unsharded(batch)
    for task, expected in full_predictions.items():
        torch.testing.assert_close(sharded_predictions[task], expected, rtol=1e-5, atol=1e-6, msg=f"task {task}")
    torch.testing.assert_close(sharded_loss, full_loss, rtol=1e-5, atol=1e-6)

    # Evaluation over both ranks (padded tail, cross-rank reduction) equals metrics of the whole test set computed
    # in one place from the unsharded model.
    eval_pipeline = make_eval_pipeline(sharded, env.device)
    test_loader = BatchLoader(test_log, features, 512, rank, world_size, shuffle=False, pad_tail=True)
    users = np.concatenate([shard.keys[log.metadata["user_id"]] for shard in test_log])
    distributed_metrics = evaluate(sharded, eval_pipeline, test_loader, EVALUATED_TASKS, show_progress=False, groups=users)
    everything = BatchLoader(test_log, features, log.rows("test"), shuffle=False)
    with torch.no_grad():
        _, (_, predictions, labels) = unsharded(next(iter(everything)))
    for task, kind in EVALUATED_TASKS.items():
        present = ~torch.isnan(labels[task])
        p, y = predictions[task][present].double(), labels[task][present].double()
        if kind == "binary":
            expected = float(binary_auroc(p, y.long()))
            # torchrec's AUC is computed in float32, torchmetrics' here in float64
            assert abs(distributed_metrics[task]["auc"] - expected) < 1e-4, (task, distributed_metrics[task], expected)
            # GAUC over rows spread across both ranks: each user's AUC, averaged, as computed in one place
            per_user = []
            for user in np.unique(users[present.numpy()]):
                mine = torch.from_numpy(users[present.numpy()] == user)
                if 0 < y[mine].mean() < 1 and p[mine].unique().numel() > 1:
                    per_user.append(float(binary_auroc(p[mine], y[mine].long())))
            gauc = distributed_metrics[task]["gauc"]
            assert abs(gauc - np.mean(per_user)) < 1e-4, (task, gauc, np.mean(per_user), len(per_user))
        else:
            expected = float(((p - y) ** 2).mean().sqrt())
            assert abs(distributed_metrics[task]["rmse"] - expected) < 1e-5, (task, distributed_metrics[task], expected)

    # A short pipelined run at this world size: finite losses, and the sharded tables change.
    def local_table_shards():
        return {
            (name, i): shard.tensor.clone()
            for name, value in sharded.state_dict().items()
            if isinstance(value, ShardedTensor)
            for i, shard in enumerate(value.local_shards())
        }

    before = local_table_shards()
    sharded.train()
    pipeline = make_pipeline(sharded, optimizer, env.device)  # after the eval pipeline rewrote the same model
    summary = train(sharded, pipeline, loader, epochs=1, show_progress=False)
    assert summary.steps == len(loader) and len(summary.losses) == 1, "one mean loss per epoch"
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    after = local_table_shards()
    assert before and any(not torch.equal(before[k], after[k]) for k in before), "no local table shard trained"
    torch.distributed.destroy_process_group()
