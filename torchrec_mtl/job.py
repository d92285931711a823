"""The main job: data -> sharded multi-task model -> pipelined training -> per-task evaluation -> table and JSON.

Runs at any world size: alone (one gloo process) or under torchrun. Rank 0 preprocesses the logs into shards when
they changed (torchrec_mtl.data.prepare); every rank then memory-maps the same shards, takes its own batches, and the
metrics are reduced across ranks.

Example::

    >>> results = run_job(load_config("configs/mmoe_synthetic.yaml"))  # doctest: +SKIP
    >>> results["tasks"]["ctr"]["auc"], results["tasks"]["ctr"]["ceiling"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_mtl.config import ConfigError, JobConfig, ModelConfig, TowerConfig, config_to_dict, task_set
from torchrec_mtl.data import synthetic
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.prepare import prepare_shards, shards_dir
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.model import MultiTaskModel, MultiTaskTrain
from torchrec_mtl.modules.towers import PLE, MMoE, SharedBottom, SingleTask
from torchrec_mtl.tasks import TOWER_TASKS, MultiTaskObjective
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed, shard_model
from torchrec_mtl.train.diagnostics import GateMonitor, leak_warnings
from torchrec_mtl.train.loop import make_pipeline, train, evaluate

# The headline metric of a task by kind: AUC (higher is better) or RMSE (lower is better).
HEADLINE = {"binary": "auc", "regression": "rmse"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(
    config: ModelConfig,
    num_dense: int,
    table_sizes: Dict[str, int],
    device: torch.device = torch.device("meta"),
    task_names: Optional[List[str]] = None,
) -> MultiTaskModel:
    """One embedding table per categorical feature (``table_sizes``: feature -> rows) under the configured tower."""
    tables = [
        EmbeddingBagConfig(
            name=f"t_{feature}", embedding_dim=config.embedding_dim, num_embeddings=rows, feature_names=[feature]
        )
        for feature, rows in table_sizes.items()
    ]
    in_features = MultiTaskModel.tower_in_features(len(tables), config.embedding_dim)
    tower = build_tower(config.tower, in_features, task_names or TOWER_TASKS)
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    return MultiTaskModel(ebc, num_dense, config.dense_arch_layer_sizes, tower)


def build_tower(config: TowerConfig, in_features: int, task_names: List[str]) -> torch.nn.Module:
    """The configured tower over ``in_features`` inputs with one logit per task."""
    sizes = {"tower_layer_sizes": config.tower_layer_sizes}
    if config.kind == "mmoe":
        return MMoE(in_features, task_names, config.num_experts, config.expert_layer_sizes, **sizes)
    if config.kind == "ple":
        return PLE(
            in_features,
            task_names,
            num_levels=config.num_levels,
            num_shared_experts=config.num_shared_experts,
            num_task_experts=config.num_task_experts,
            expert_layer_sizes=config.expert_layer_sizes,
            **sizes,
        )
    if config.kind == "single_task":
        return SingleTask(in_features, task_names, config.expert_layer_sizes, **sizes)
    return SharedBottom(in_features, task_names, config.expert_layer_sizes, **sizes)


def _ensure_synthetic_data(config: JobConfig, env: DistributedEnv) -> None:
    """Generate the configured synthetic log on rank 0 unless ``data.dir`` already holds it with the same config."""
    generate = config.data.generate
    if generate is None:
        return
    meta_path = Path(config.data.dir) / "meta.json"
    if env.is_main:
        wanted = dataclasses.asdict(generate)
        existing = json.loads(meta_path.read_text()).get("config") if meta_path.exists() else None
        if existing != wanted:
            print(f"generating the synthetic log ({generate.num_rows:,} rows) into {config.data.dir} ...", flush=True)
            meta = synthetic.generate(generate, config.data.dir)
            print(f"  rows {meta['rows']}, rates {json.dumps(meta['rates'])}", flush=True)
        else:
            print(f"reusing the synthetic log in {config.data.dir}", flush=True)
    dist.barrier()


def load_data(config: JobConfig, env: DistributedEnv) -> ShardedLog:
    """Rank 0 preprocesses the logs when needed; every rank then maps the same shards."""
    if env.is_main:
        prepare_shards(config.data, progress=config.training.progress)
    dist.barrier()
    return ShardedLog.open(shards_dir(config.data))


def _shuffled_labels(shards: List[EncodedLog], seed: int) -> List[EncodedLog]:
    """The same rows with the label rows permuted together: features keep nothing to learn from."""
    log = EncodedLog.concat(shards)
    order = np.random.default_rng(seed).permutation(len(log))
    return [EncodedLog(log.dense, log.sparse, {name: values[order] for name, values in log.labels.items()})]


def _effective_weights(model: torch.nn.Module) -> Dict[str, float]:
    """Each loss term's multiplier at the end of training, as the objective's weighting reports it."""
    weighting = next(m for m in model.modules() if hasattr(m, "effective_weights"))
    return weighting.effective_weights()


def _ceilings(data_dir: str) -> Optional[Dict[str, float]]:
    meta = Path(data_dir) / "meta.json"
    return json.loads(meta.read_text()).get("ceilings") if meta.exists() else None


def headline(values: Dict[str, float]) -> str:
    """The headline metric among a task's metrics."""
    return "auc" if "auc" in values else "rmse"


def format_table(tasks: Dict[str, Dict[str, float]]) -> str:
    """A per-task text table: headline metric beside its ceiling, then the other metrics."""
    lines = [f"{'task':<8}{'metric':<8}{'value':>8}{'ceiling':>9}{'gap':>8}   other"]
    for task, values in tasks.items():
        metric = headline(values)
        ceiling = values.get("ceiling")
        gap = "" if ceiling is None else f"{abs(ceiling - values[metric]):8.4f}"
        ceiling_text = "" if ceiling is None else f"{ceiling:9.4f}"
        others = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in (metric, "ceiling"))
        lines.append(f"{task:<8}{metric:<8}{values[metric]:8.4f}{ceiling_text:>9}{gap:>8}   {others}")
    return "\n".join(lines)


def run_job(config: JobConfig, env: Optional[DistributedEnv] = None) -> Dict:
    """Train and evaluate as configured; rank 0 prints the table and writes ``out_dir/results.json``."""
    env = env or init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))))
    started = time.perf_counter()
    _ensure_synthetic_data(config, env)
    log = load_data(config, env)
    tasks = task_set(config.objective)
    missing = [label for label in tasks.labels if label not in log.label_kinds]
    if missing:
        raise ConfigError(
            f"objective.tasks: label column(s) {missing} are not in the preprocessed data "
            f"({shards_dir(config.data)} has {list(log.label_kinds)})"
        )
    train_shards, test_shards = log.split("train"), log.split("test")
    training = config.training
    if training.shuffle_labels:
        train_shards = _shuffled_labels(train_shards, training.seed)

    seed_everything(training.seed)
    table_sizes = log.table_sizes
    features = log.categorical_features
    if env.is_main:
        print(
            f"{log.rows('train'):,} train and {log.rows('test'):,} test rows; embedding rows per feature: "
            + ", ".join(f"{f} {n:,}" for f, n in table_sizes.items()),
            flush=True,
        )
    model = build_model(config.model, len(log.dense_features), table_sizes, task_names=tasks.tower_tasks)
    offsets = {t.name: log.label_mean("train", t.label) or 0.0 for t in tasks.tasks if t.kind == "regression"}
    objective = MultiTaskObjective(
        tasks,
        offsets,
        config.objective.weighting,
        config.objective.min_propensity,
        config.objective.gradient_cosine_every,
    )
    sharded, optimizer = shard_model(
        MultiTaskTrain(model, objective),
        env,
        training.embedding_optimizer,
        training.embedding_lr,
        training.dense_lr,
        training.sharding_types,
    )
    pipeline = make_pipeline(sharded, optimizer, env.device)
    show = training.progress and env.is_main
    train_loader = BatchLoader(
        train_shards, features, training.batch_size, env.rank, env.world_size, shuffle=True, seed=training.seed
    )
    summary = train(
        sharded,
        pipeline,
        train_loader,
        training.epochs,
        show_progress=show,
        task_kinds=tasks.names,
        curve_every=training.curve_every,
    )
    test_loader = BatchLoader(
        test_shards, features, training.eval_batch_size, env.rank, env.world_size, shuffle=False, pad_tail=True
    )
    gated = [m for m in sharded.modules() if hasattr(m, "gate_weights")]
    with GateMonitor(gated[0]) if gated else contextlib.nullcontext() as monitor:
        metrics = evaluate(sharded, pipeline, test_loader, tasks.names, show_progress=show)
    cosine = objective.gradient_cosine
    warnings = (monitor.warnings() if monitor else []) + (cosine.warnings() if cosine else []) + leak_warnings(metrics)

    ceilings = _ceilings(config.data.dir) or {}
    per_task = {}
    for task, values in metrics.items():
        metric = HEADLINE[tasks.names[task]]
        ceiling = ceilings.get(f"{task}_{metric}")
        per_task[task] = {metric: values[metric], **({"ceiling": ceiling} if ceiling is not None else {})}
        per_task[task].update({k: v for k, v in values.items() if k != metric})
    results = {
        "tasks": per_task,
        "training": {
            "world_size": env.world_size,
            "rows": {"train": log.rows("train"), "test": log.rows("test")},
            "steps": summary.steps,
            "samples_per_s": round(summary.samples_per_second, 1),
            "train_seconds": round(summary.seconds, 2),
            "epoch_losses": summary.losses,
            "curve": summary.curve,
            "effective_weights": _effective_weights(sharded),
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        "diagnostics": {
            "gates": monitor.summary() if monitor else None,
            "gradient_cosine": cosine.summary() if cosine else None,  # this rank's training steps
            "warnings": warnings,
        },
        "config": config_to_dict(config),
    }
    if env.is_main:
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(format_table(per_task))
        for warning in warnings:
            print(f"warning: {warning}")
        print(
            f"trained {summary.steps} steps at {summary.samples_per_second:,.0f} samples/s on {env.world_size} "
            f"process(es); results in {out / 'results.json'}"
        )
    return results
