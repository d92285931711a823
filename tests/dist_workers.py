"""Worker functions for multi-process tests; spawned processes import them from here by name."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_mtl.config import DataConfig, InteractionConfig, JobConfig, ModelConfig, SequenceConfig
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.build import build_model
from torchrec_mtl.run.prepare import load_data
from torchrec_mtl.model import MultiTaskTrain
from esmm import EVALUATED_TASKS, EsmmObjective
from torchrec_mtl.train.distributed import init_distributed, load_full_state, shard_model
from torchrec_mtl.train.loop import evaluate, make_eval_pipeline, make_pipeline, train


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)


def sharded_matches_unsharded(
    rank: int,
    world_size: int,
    port: int,
    log_dir: str,
    sharding_type: str,
    interaction: str = "dot",
    schema: Optional[str] = None,
    sequence: Optional[SequenceConfig] = None,
) -> None:
    """Same weights: the sharded model's predictions and its evaluation over both ranks equal the unsharded model's;
    then it trains. ``interaction``: the model's interaction kind (torchrec_mtl.modules.interactions); ``schema``:
    the log's schema (default: the synthetic one; one with list columns puts pooled lists in the batches);
    ``sequence``: attention over some of those lists (their tables then in a sharded EmbeddingCollection)."""
    _join(rank, world_size, port)
    env = init_distributed()
    data = DataConfig(dir=log_dir, **({"schema": schema} if schema else {}))
    model_config = ModelConfig(interaction=InteractionConfig(kind=interaction), sequence=sequence or SequenceConfig())
    config = JobConfig(data=data, model=model_config)
    log = load_data(config, env)
    features, train_shards, test_log = log.categorical_features, log.split("train"), log.split("test")
    torch.manual_seed(0)
    model = build_model(
        config.model, len(log.dense_features), log.table_sizes, device=torch.device("cpu"), lists=log.lists
    )
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
    sharded_kinds = {type(m).__name__ for m in sharded.modules() if type(m).__name__.startswith("Sharded")}
    expected_kinds = {"ShardedEmbeddingBagCollection"} | ({"ShardedEmbeddingCollection"} if sequence else set())
    assert sharded_kinds == expected_kinds, sharded_kinds
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
            # a user has a handful of rows: one pair of scores that ties in float32 (torchrec) and not in float64
            # (here) moves that user's AUC by up to 1 / pairs, so the mean over ~180 users by up to ~3e-4
            assert abs(gauc - np.mean(per_user)) < 5e-4, (task, gauc, np.mean(per_user), len(per_user))
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
    # the pipeline found every sharded collection (their input distribution runs a batch ahead); private, no API says
    pipelined = sorted(type(m).__name__ for m in pipeline._pipelined_modules)
    assert pipelined == sorted(expected_kinds), pipelined
    assert summary.steps == len(loader) and len(summary.losses) == 1, "one mean loss per epoch"
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    after = local_table_shards()
    assert before and any(not torch.equal(before[k], after[k]) for k in before), "no local table shard trained"
    torch.distributed.destroy_process_group()


class _LabelPoisonedAt:
    """``loader``'s batches, but batch ``index`` (0-based, every epoch) gets ``label`` = +inf on every row; the time it
    is handed out goes to ``stamp`` (a file). Everything else is the loader's."""

    def __init__(self, loader: BatchLoader, index: int, label: str, stamp: str) -> None:
        self.loader, self.index, self.label, self.stamp = loader, index, label, stamp

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == self.index:
                batch.labels[self.label] = torch.full_like(batch.labels[self.label], float("inf"))
                with open(self.stamp, "w") as handle:
                    handle.write(repr(time.time()))
            yield batch


def non_finite_loss_on_one_rank(
    rank: int,
    world_size: int,
    port: int,
    config_path: str,
    overrides: list,
    out_dir: str,
    bad_rank: int,
    bad_batch: int,
) -> None:
    """Train the configured job for real (prepare_job, TrainPipelineSparseDist, a checkpoint trigger); rank
    ``bad_rank``'s batch ``bad_batch`` has an infinite rating label. Each rank writes ``rank-<r>.json``: the exception
    that ended its training (type, message) and when."""
    from torchrec_mtl.config import load_config
    from torchrec_mtl.run import prepare_job
    from torchrec_mtl.train.checkpoint import Checkpointer
    from torchrec_mtl.train.resume import CheckpointTrigger, save_run

    _join(rank, world_size, port)
    config = load_config(config_path, overrides)
    env = init_distributed(timeout_s=config.training.collective_timeout_s)
    job = prepare_job(config, env)
    loader = job.loader("train")
    if rank == bad_rank:
        loader = _LabelPoisonedAt(loader, bad_batch, "rating", os.path.join(out_dir, "poisoned_at"))
    checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"))
    rows = loader.batch_size * loader.world_size

    def save(summary, window):
        return save_run(checkpointer, job.sharded, job.optimizer, summary, window, rows, {})

    trigger = CheckpointTrigger(save, every_steps=1000, handle_sigterm=False, checkpointer=checkpointer)
    outcome = {"type": None, "message": None}
    try:
        train(job.sharded, job.pipeline, loader, 1, show_progress=False, task_kinds=job.tasks.names, curve_every=50,
              after_step=trigger)  # fmt: skip
    except Exception as error:  # what ended training on this rank, whatever it was
        outcome = {"type": type(error).__name__, "message": str(error)}
    outcome["ended_at"] = time.time()
    _write_outcome_and_exit(out_dir, rank, outcome, group_usable=outcome["type"] == "NonFiniteLoss")


def checkpoint_blocked_at(
    rank: int, world_size: int, port: int, config_path: str, overrides: list, out_dir: str, blocked_step: int
) -> None:
    """Train the configured job with a checkpoint every 2 steps while a file stands where step ``blocked_step``'s
    partial folder goes (only rank 0 creates it: rank 1 learns only that another rank failed). Each rank writes
    ``rank-<r>.json`` as ``non_finite_loss_on_one_rank`` does."""
    from torchrec_mtl.config import load_config
    from torchrec_mtl.run import prepare_job
    from torchrec_mtl.train.checkpoint import Checkpointer
    from torchrec_mtl.train.resume import CheckpointTrigger, save_run

    _join(rank, world_size, port)
    config = load_config(config_path, overrides)
    env = init_distributed(timeout_s=config.training.collective_timeout_s)
    job = prepare_job(config, env)
    loader = job.loader("train")
    checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"))
    rows = loader.batch_size * loader.world_size

    def save(summary, window):
        return save_run(checkpointer, job.sharded, job.optimizer, summary, window, rows, {})

    trigger = CheckpointTrigger(save, every_steps=2, handle_sigterm=False, checkpointer=checkpointer, retry_after_s=0)
    outcome = {"type": None, "message": None}
    try:
        train(job.sharded, job.pipeline, loader, 1, show_progress=False, after_step=trigger)
    except Exception as error:
        outcome = {"type": type(error).__name__, "message": str(error)}
    outcome["ended_at"] = time.time()
    _write_outcome_and_exit(out_dir, rank, outcome, group_usable=True)


def _write_outcome_and_exit(out_dir: str, rank: int, outcome: dict, group_usable: bool) -> None:
    """Write ``rank-<r>.json`` and end the process with status 0 once every rank has written its own (a barrier,
    when the ranks stopped together), skipping the interpreter's teardown: after a training loop ended by an
    exception, the pipeline's objects are destroyed at exit, and about one run in ten (seen with gloo on 2 cores)
    the process then aborted ("terminate called without an active exception", SIGABRT) after both outcomes were
    written, failing a test whose behaviour had held."""
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as handle:
        json.dump(outcome, handle)
    if group_usable:
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
