"""The main job: data -> sharded multi-task model -> pipelined training -> per-task evaluation -> table and JSON.

Writes to ``out_dir``: ``results.json`` (metrics, segments, curve, diagnostics, config), ``predictions.npz`` (each test
row's ``<task>.prediction`` and ``<task>.label``, for the report) and ``checkpoints/`` (torchrec_mtl.train.checkpoint).

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
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist, TrainPipelineSparseDist
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_mtl.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    TextConfig,
    TowerConfig,
    config_from_dict,
    config_to_dict,
    retrieval_features,
    table_groups,
    task_set,
)
from torchrec_mtl.data import synthetic
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.prepare import MissingInputError, prepare_shards, resolve_files, shards_dir
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.model import MultiTaskModel, MultiTaskTrain
from torchrec_mtl.modules.item_text import (
    ITEM_TEXT_FEATURE,
    ITEM_TEXT_TABLE,
    EncodedItemTextArch,
    ItemTextArch,
    item_text_collection,
    tokenize_descriptions,
)
from torchrec_mtl.finetune import for_task, freeze
from torchrec_mtl.headline import headline
from torchrec_mtl.inference import model_inputs
from torchrec_mtl.modules.towers import PLE, MMoE, SharedBottom, SingleTask
from torchrec_mtl.outputs import claim_folder
from torchrec_mtl.modules.two_tower import InBatchSoftmax, TwoTowerArch
from torchrec_mtl.tasks import TOWER_TASKS, MultiTaskObjective, TaskSet
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.text.cache import encode_items_file
from torchrec_mtl.text.table import ItemTextTable
from torchrec_mtl.train.distributed import (
    DistributedEnv,
    TableOptions,
    init_distributed,
    load_table_weights,
    shard_model,
)
from torchrec_mtl.train.optimizers import LearningRateSchedule, table_name
from torchrec_mtl.train.diagnostics import GateMonitor, label_copy_warnings, leak_warnings
from torchrec_mtl.train.board import RunBoard
from torchrec_mtl.train.checkpoint import (
    TRAIN_STATE,
    Checkpointer,
    CheckpointError,
    TrainingStopped,
    read_train_state,
    resolve_checkpoint,
)
from torchrec_mtl.train.loop import NonFiniteLoss, evaluate, make_eval_pipeline, make_pipeline, train
from torchrec_mtl.train.resume import CheckpointTrigger, load_model_state, restore_run, resume_path, save_run
from torchrec_mtl.train.thresholds import best_f1_threshold, threshold_metrics


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
    item_text: Optional[torch.nn.Module] = None,
    retrieval_features: Optional[Tuple[List[str], List[str]]] = None,
) -> MultiTaskModel:
    """One embedding table per categorical feature (``table_sizes``: feature -> rows) under the configured tower,
    with ``item_text`` (``build_item_text``) as one more embedding when given, and with ``retrieval_features``
    (the user and the item tower's features) the two-tower arch of ``config.retrieval``."""
    tables = [
        EmbeddingBagConfig(
            name=f"t_{feature}", embedding_dim=config.embedding_dim, num_embeddings=rows, feature_names=[feature]
        )
        for feature, rows in table_sizes.items()
    ]
    in_features = MultiTaskModel.tower_in_features(len(tables) + (item_text is not None), config.embedding_dim)
    tower = build_tower(config.tower, in_features, task_names or TOWER_TASKS)
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    two_tower = None
    if retrieval_features is not None:
        columns = [[list(table_sizes).index(feature) for feature in side] for side in retrieval_features]
        r = config.retrieval
        two_tower = TwoTowerArch(*columns, config.embedding_dim, item_text is not None, r.layer_sizes, r.dim)
    return MultiTaskModel(ebc, num_dense, config.dense_arch_layer_sizes, tower, item_text, two_tower)


def build_item_text(
    config: TextConfig, embedding_dim: int, table: ItemTextTable, device: torch.device = torch.device("meta")
) -> torch.nn.Module:
    """The item-text arch: the frozen (or tuned) table of cached vectors, or (``online``, ``finetune_layers``) the
    BERT itself run on each batch's descriptions, its top ``finetune_layers`` layers trained."""
    if not config.online and config.finetune_layers == 0:
        collection = item_text_collection(table.num_items, table.dim, device)
        return ItemTextArch(collection, embedding_dim, config.projection_layer_sizes, trainable=config.trainable)
    from torchrec_mtl.text.encoder import TextEncoder

    encoder = TextEncoder(config.encoder, pooling=config.pooling)
    token_ids, attention_mask = tokenize_descriptions(encoder.tokenizer, table.descriptions[1:])
    return EncodedItemTextArch(
        encoder.model.train(),
        token_ids,
        attention_mask,
        embedding_dim,
        config.projection_layer_sizes,
        trainable_layers=config.finetune_layers,
    )


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
        existing = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if (existing.get("config"), existing.get("generator_version")) != (wanted, synthetic.GENERATOR_VERSION):
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


def load_item_text(config: JobConfig, env: DistributedEnv, log: ShardedLog) -> ItemTextTable:
    """Rank 0 brings the vector cache up to date with the items file (encoding only new or changed descriptions);
    every rank then reads the table."""
    text = config.model.text
    key_column = log.metadata.get("item_text_key")
    if key_column is None:
        raise ConfigError(f"model.text: the schema {config.data.schema} declares no item_text_key column")
    items, cache = (Path(config.data.dir) / name for name in (text.items, text.cache))
    if env.is_main:
        if not items.exists():
            raise ConfigError(f"model.text.items: {items} does not exist (an items file: item_id, description)")
        from torchrec_mtl.text.encoder import TextEncoder

        encoder = TextEncoder(text.encoder, pooling=text.pooling)
        summary = encode_items_file(items, cache, encoder, progress=config.training.progress)
        print(
            f"item text: {summary['items']:,} items, {summary['encoded']:,} encoded, {summary['reused']:,} reused "
            f"from {cache}",
            flush=True,
        )
    dist.barrier()
    return ItemTextTable.load(items, cache, DatasetSchema.from_yaml(config.data.schema).categorical_format)


def with_item_text_rows(shards: List[EncodedLog], table: ItemTextTable, key_column: str) -> List[EncodedLog]:
    """Each shard with one more sparse column: the text-table row of the row's item (``ITEM_TEXT_FEATURE``)."""
    return [
        shard.with_sparse(np.concatenate([shard.sparse, table.rows(shard.keys[key_column])[:, None]], axis=1))
        for shard in shards
    ]


def cold_item_rows(train: List[EncodedLog], test: List[EncodedLog], item_column: str) -> np.ndarray:
    """A mask over the test rows (in order): True where the row's item never appears in the training split."""
    seen = np.unique(np.concatenate([np.unique(shard.keys[item_column]) for shard in train]))
    return ~np.isin(np.concatenate([shard.keys[item_column] for shard in test]), seen)


def _shuffled_labels(shards: List[EncodedLog], seed: int) -> List[EncodedLog]:
    """The same rows with the label rows permuted together: features keep nothing to learn from."""
    log = EncodedLog.concat(shards)
    order = np.random.default_rng(seed).permutation(len(log))
    return [EncodedLog(log.dense, log.sparse, {name: values[order] for name, values in log.labels.items()}, log.keys)]


def split_validation(
    shards: List[EncodedLog], fraction: float, seed: int
) -> Tuple[List[EncodedLog], List[EncodedLog]]:
    """``(train, validation)``: ``fraction`` of each shard's rows (rounded), drawn by a permutation seeded with
    ``seed``, held out as validation rows; the rest stay for training, in their order. Every rank maps the same shards
    and draws the same rows, so the split is the same on every rank (each then takes its own batches of either).

    Example::

        >>> log = EncodedLog(np.zeros((10, 1), np.float32), np.zeros((10, 1), np.int64), {"click": np.ones(10)})
        >>> train, validation = split_validation([log], 0.2, seed=0)
        >>> len(train[0]), len(validation[0])
        (8, 2)
    """
    if fraction <= 0:
        return shards, []
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for shard in shards:
        held = np.zeros(len(shard), dtype=bool)
        held[rng.permutation(len(shard))[: round(fraction * len(shard))]] = True
        train.append(shard.take(np.flatnonzero(~held)))
        if held.any():
            validation.append(shard.take(np.flatnonzero(held)))
    return train, validation


def _effective_weights(model: torch.nn.Module) -> Dict[str, float]:
    """Each loss term's multiplier at the end of training, as the objective's weighting reports it."""
    weighting = next(m for m in model.modules() if hasattr(m, "effective_weights"))
    return weighting.effective_weights()


def _ceilings(data_dir: str) -> Optional[Dict[str, float]]:
    meta = Path(data_dir) / "meta.json"
    return json.loads(meta.read_text()).get("ceilings") if meta.exists() else None


# a binary task's metrics at its threshold (``_threshold_metrics``), shown in a table of their own
THRESHOLD_KEYS = ("threshold", "precision", "recall", "f1")


def format_table(tasks: Dict[str, Dict[str, float]]) -> str:
    """A per-task text table: headline metric beside its ceiling, then the other metrics; below it, for the tasks
    that have them, precision, recall and F1 at the task's threshold."""
    width = max([8, *(len(task) + 2 for task in tasks)])
    lines = [f"{'task':<{width}}{'metric':<8}{'value':>8}{'ceiling':>9}{'gap':>8}   other"]
    for task, values in tasks.items():
        metric = headline(values)
        ceiling = values.get("ceiling")
        gap = "" if ceiling is None else f"{abs(ceiling - values[metric]):8.4f}"
        ceiling_text = "" if ceiling is None else f"{ceiling:9.4f}"
        others = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in (metric, "ceiling", *THRESHOLD_KEYS))
        lines.append(f"{task:<{width}}{metric:<8}{values[metric]:8.4f}{ceiling_text:>9}{gap:>8}   {others}")
    thresholded = {task: values for task, values in tasks.items() if "f1" in values}
    if thresholded:
        lines.append(f"{'task':<{width}}{'threshold':>10}{'precision':>11}{'recall':>8}{'f1':>8}")
        for task, v in thresholded.items():
            lines.append(f"{task:<{width}}{v['threshold']:10.4f}{v['precision']:11.4f}{v['recall']:8.4f}{v['f1']:8.4f}")
    return "\n".join(lines)


def _headline_first(
    metrics: Dict[str, Dict[str, float]], ceilings: Optional[Dict[str, float]] = None
) -> Dict[str, Dict[str, float]]:
    """Each task's metrics with its headline metric first, and its ceiling when the data know it."""
    per_task = {}
    for task, values in metrics.items():
        metric = headline(values)
        ceiling = (ceilings or {}).get(f"{task}_{metric}")
        per_task[task] = {metric: values[metric], **({"ceiling": ceiling} if ceiling is not None else {})}
        per_task[task].update({k: v for k, v in values.items() if k != metric})
    return per_task


def _evaluate_item_segments(job: "PreparedJob") -> Dict[str, Tuple[int, Dict[str, Dict[str, float]]]]:
    """The test metrics again on rows whose item never appears in training (``cold``) and on the rest (``warm``),
    when the schema names an item column; each with its row count."""
    item_column = job.log.metadata.get("item_id")
    if item_column is None:
        return {}
    cold = cold_item_rows(job.train_shards, job.test_shards, item_column)
    test = EncodedLog.concat(job.test_shards)
    segments = {}
    for name, mask in (("cold", cold), ("warm", ~cold)):
        if not mask.any():
            continue
        loader = BatchLoader(
            test.take(np.flatnonzero(mask)),
            job.features,
            job.config.training.eval_batch_size,
            job.env.rank,
            job.env.world_size,
            shuffle=False,
            pad_tail=True,
        )
        segments[name] = (int(mask.sum()), evaluate(job.sharded, job.eval_pipeline, loader, job.tasks.names, False))
    return segments


@dataclasses.dataclass
class PreparedJob:
    """Everything ``run_job`` trains and evaluates: the data as this rank's shards and the sharded model with its
    pipeline, ready for ``train``. Built by ``prepare_job``."""

    config: JobConfig
    env: DistributedEnv
    log: ShardedLog
    tasks: TaskSet
    train_shards: List[EncodedLog]
    test_shards: List[EncodedLog]
    features: List[str]  # the KJT keys: the categorical features, then ITEM_TEXT_FEATURE with text
    text_table: Optional[ItemTextTable]
    objective: MultiTaskObjective
    sharded: DistributedModelParallel
    optimizer: KeyedOptimizer  # the embedding (fused) and dense optimizers combined
    pipeline: TrainPipelineSparseDist
    eval_pipeline: EvalPipelineSparseDist
    schedule: Optional[LearningRateSchedule]  # every learning rate, by step
    retrieval_features: Optional[Tuple[List[str], List[str]]] = None  # the two towers' features
    # training rows held out of train_shards (data.validation_fraction), for choosing thresholds
    validation_shards: List[EncodedLog] = dataclasses.field(default_factory=list)

    def rows(self) -> Dict[str, int]:
        """Rows per split as trained and evaluated: ``train`` (less the validation rows), ``validation`` (only when
        rows are held out) and ``test``."""
        held = sum(len(shard) for shard in self.validation_shards)
        return {"train": self.log.rows("train") - held, **({"validation": held} if held else {}),
                "test": self.log.rows("test")}  # fmt: skip

    def test_users(self) -> Optional[np.ndarray]:
        """The raw user key of each test row (for GAUC), when the schema names a user column."""
        user_column = self.log.metadata.get("user_id")
        if user_column is None:
            return None
        return np.concatenate([shard.keys[user_column] for shard in self.test_shards])

    def loader(self, split: str) -> BatchLoader:
        """This rank's batches: shuffled full batches of the training split (``train``), or every row of ``validation``
        or ``test`` once."""
        training, env = self.config.training, self.env
        if split == "train":
            item_column = self.log.metadata.get("item_id")
            if training.item_id_dropout and item_column is None:
                raise ConfigError(f"training.item_id_dropout: the schema {self.config.data.schema} has no item_id")
            return BatchLoader(
                self.train_shards, self.features, training.batch_size, env.rank, env.world_size, shuffle=True,
                seed=training.seed, id_dropout={item_column: training.item_id_dropout} if item_column else None,
            )  # fmt: skip
        if split == "validation" and not self.validation_shards:
            raise ConfigError("data.validation_fraction: no training rows are held out for validation; set it > 0")
        if split not in ("validation", "test"):
            raise ValueError(f"split: {split!r}; allowed: train, validation, test")
        return BatchLoader(
            self.validation_shards if split == "validation" else self.test_shards, self.features,
            training.eval_batch_size, env.rank, env.world_size, shuffle=False, pad_tail=True,
        )  # fmt: skip


def prepare_job(config: JobConfig, env: DistributedEnv) -> PreparedJob:
    """Data (generated and preprocessed when needed), item text (encoded when needed) and the sharded model."""
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

    features = log.categorical_features
    text_table = None
    if config.model.text is not None:
        text_table = load_item_text(config, env, log)
        train_shards, test_shards = (
            with_item_text_rows(shards, text_table, log.metadata["item_text_key"])
            for shards in (train_shards, test_shards)
        )
        features = [*features, ITEM_TEXT_FEATURE]
    train_shards, validation_shards = split_validation(train_shards, config.data.validation_fraction, training.seed)

    seed_everything(training.seed)
    table_sizes = log.table_sizes
    if env.is_main:
        held = sum(len(shard) for shard in validation_shards)
        print(
            f"{log.rows('train') - held:,} train" + (f", {held:,} validation" if held else "")
            + f" and {log.rows('test'):,} test rows; embedding rows per feature: "
            + ", ".join(f"{f} {n:,}" for f, n in table_sizes.items()),
            flush=True,
        )
    item_text = build_item_text(config.model.text, config.model.embedding_dim, text_table) if text_table else None
    two_tower_features = None
    if tasks.retrieval is not None:
        two_tower_features = retrieval_features(config.model.retrieval, DatasetSchema.from_yaml(config.data.schema))
    model = build_model(
        config.model, len(log.dense_features), table_sizes, task_names=tasks.tower_tasks, item_text=item_text,
        retrieval_features=two_tower_features,
    )  # fmt: skip
    frozen_parts = config.finetune.freeze if config.finetune is not None else []
    freeze(model, frozen_parts)
    offsets = {t.name: log.label_mean("train", t.label) or 0.0 for t in tasks.tasks if t.kind == "regression"}
    retrieval_loss, item_feature = None, None
    if two_tower_features is not None:
        retrieval_loss, item_feature = _retrieval_loss(
            config, tasks.retrieval.label, train_shards, features, two_tower_features, table_sizes
        )
    objective = MultiTaskObjective(
        tasks,
        offsets,
        config.objective.weighting,
        config.objective.min_propensity,
        config.objective.gradient_cosine_every,
        retrieval_loss,
        item_feature,
    )
    try:
        sharded, optimizer = shard_model(
            MultiTaskTrain(model, objective),
            env,
            training.embedding_optimizer,
            training.embedding_lr,
            training.dense_lr,
            training.sharding_types,
            tables={
                table_name(feature): TableOptions(t.sharding_types, t.compute_kernels, t.optimizer, t.lr)
                for feature, t in table_groups(training).items()
            },
            memory_budget_bytes=int(training.memory_budget_gb * 2**30) if training.memory_budget_gb else None,
            dense_optimizer_name=training.dense_optimizer,
            weight_decay=training.weight_decay,
            clip_norm=training.gradient_clip_norm,
            print_plan=training.print_plan,
        )
    except ValueError as error:  # a table option or the memory budget the planner or FBGEMM cannot meet
        raise ConfigError(f"training: {error}") from None
    if isinstance(item_text, ItemTextArch):
        load_table_weights(sharded, ITEM_TEXT_TABLE, torch.from_numpy(text_table.vectors))
    if "embeddings" in frozen_parts:  # the fused optimizers update tables inside backward: a rate of 0 keeps them
        for group in sharded.fused_optimizer.param_groups:
            group["lr"] = 0.0
    job = PreparedJob(
        config, env, log, tasks, train_shards, test_shards, features, text_table, objective, sharded, optimizer,
        make_pipeline(sharded, optimizer, env.device), make_eval_pipeline(sharded, env.device), None,
    )  # fmt: skip
    job.validation_shards = validation_shards
    job.retrieval_features = two_tower_features
    job.schedule = LearningRateSchedule(
        optimizer, training.warmup_steps, training.epochs * len(job.loader("train")), training.lr_decay,
        training.min_lr_ratio,
    )  # fmt: skip
    return job


def _retrieval_loss(
    config: JobConfig,
    label: str,
    train_shards: List[EncodedLog],
    features: List[str],
    two_tower_features: Tuple[List[str], List[str]],
    table_sizes: Dict[str, int],
) -> Tuple[InBatchSoftmax, str]:
    """The retrieval task's loss, its popularity correction counted over the training split's positive rows (the
    in-batch candidates), and the item feature it reads (the item tower's first)."""
    item_feature = two_tower_features[1][0]
    column = features.index(item_feature)
    num_rows = table_sizes[item_feature]
    counts = np.zeros(num_rows, dtype=np.int64)
    for shard in train_shards:
        positive = shard.labels[label] == 1
        counts += np.bincount(shard.sparse[positive, column], minlength=num_rows)
    r = config.model.retrieval
    return InBatchSoftmax(torch.from_numpy(counts), r.temperature, r.popularity_correction), item_feature


def checkpoint_dir(config: JobConfig) -> Path:
    return Path(config.checkpoint.dir or Path(config.out_dir) / "checkpoints")


# keys that may differ between a checkpoint's config and the run resuming it: where it writes, what it shows,
# how tables are placed (DCP reshards), more epochs (which continue the run), and how the test rows are judged
_RESUMABLE_CHANGES = {"out_dir", "checkpoint", "training.epochs", "training.progress", "training.sharding_types",
                      "evaluation"}  # fmt: skip


def _config_changes(saved: Dict, current: Dict, prefix: str = "") -> List[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        if path in _RESUMABLE_CHANGES:
            continue
        before, after = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _config_changes(before, after, f"{path}.")
        elif before != after:
            changes.append(f"{path} ({before!r} -> {after!r})")
    return changes


def _start_finetuning(job: PreparedJob) -> Dict[str, Dict[str, float]]:
    """Load the joint checkpoint's weights and return every task's test metrics before fine-tuning."""
    finetune = job.config.finetune
    path = resolve_checkpoint(finetune.checkpoint)
    load_model_state(path, job.sharded)
    show = job.config.training.progress and job.env.is_main
    before = _headline_first(evaluate(job.sharded, job.eval_pipeline, job.loader("test"), job.tasks.names, show))
    if job.env.is_main:
        print(f"fine-tuning {finetune.task} from {path}, frozen: {', '.join(finetune.freeze) or 'nothing'}; "
              f"before:\n{format_table(before)}", flush=True)  # fmt: skip
    return before


def _resume(job: PreparedJob, checkpointer: Checkpointer, global_batch_rows: int):
    """The summary and curve window to continue from (restored into the model and optimizers), or None."""
    path = resume_path(checkpointer, job.config.checkpoint.resume)
    if path is None:
        return None
    saved = read_train_state(path).get("config", {})
    try:  # keys added to the config since the checkpoint was written take their defaults there
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        pass  # compared as written: the differences are named below
    changes = _config_changes(saved, config_to_dict(job.config))
    if changes:
        raise CheckpointError(
            f"checkpoint {path}: written by another config ({'; '.join(changes[:5])}); set checkpoint.resume=never "
            "to start over"
        )
    summary, window_batches, train_state = restore_run(path, job.sharded, job.optimizer, global_batch_rows)
    if job.env.is_main:
        print(
            f"resuming from {path}: step {summary.steps}, epoch {summary.epoch + 1} batch {summary.batch}"
            + ("" if train_state["world_size"] == job.env.world_size else f" (written at world size "
               f"{train_state['world_size']}, resharded)"),
            flush=True,
        )  # fmt: skip
    return summary, window_batches


def _gathered(predictions: Dict[str, np.ndarray], env: DistributedEnv) -> Dict[str, np.ndarray]:
    """Every rank's test predictions (``evaluate``'s ``predictions_out``), on rank 0, in the test set's row order."""
    if env.world_size > 1:
        parts: List[Optional[Dict[str, np.ndarray]]] = [None] * env.world_size
        dist.all_gather_object(parts, predictions)
        predictions = {key: np.concatenate([part[key] for part in parts]) for key in predictions}
    order = np.argsort(predictions["row"], kind="stable")
    return {key: values[order] for key, values in predictions.items() if key != "row"}


def _threshold_metrics(
    job: PreparedJob, test: Dict[str, np.ndarray], show: bool
) -> Tuple[Dict[str, Dict[str, float]], List[str]]:
    """Each binary task's ``threshold_metrics`` on the gathered ``test`` predictions (``_gathered``), at
    ``evaluation.threshold`` or (``best_f1``) at the task's best-F1 threshold on the validation rows, with a warning
    for a task that has no labelled validation row (it gets no threshold metrics). With ``best_f1`` every rank
    evaluates the validation rows (collectives), so call it on every rank."""
    threshold = job.config.evaluation.threshold
    binary = [name for name, kind in job.tasks.names.items() if kind == "binary"]
    thresholds: Dict[str, float] = {name: threshold for name in binary}
    warnings = []
    if threshold == "best_f1":
        validation: Dict[str, np.ndarray] = {}
        evaluate(job.sharded, job.eval_pipeline, job.loader("validation"), job.tasks.names, show, None, validation)
        validation = _gathered(validation, job.env)
        thresholds = {}
        for name in binary:
            labels = validation[f"{name}.label"]
            if np.isnan(labels).all():
                warnings.append(f"{name}: no validation row in its sample space; no best-F1 threshold")
                continue
            thresholds[name] = best_f1_threshold(validation[f"{name}.prediction"], labels)
    metrics = {
        name: threshold_metrics(test[f"{name}.prediction"], test[f"{name}.label"], value)
        for name, value in thresholds.items()
    }
    return metrics, warnings


class _Tee:
    """A text stream writing to several (the console and the run's log file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno...: the console's
        return getattr(self.streams[0], name)


def claim_run_folder(config: JobConfig) -> Path:
    """``out_dir``, created and marked, or OutputError when it holds files of others or the run's data."""
    try:
        logs = [path for paths in resolve_files(config.data).values() for path in paths]
    except MissingInputError:  # a log still to be generated; the data folder itself stands for it
        logs = [config.data.dir]
    return claim_folder(config.out_dir, "run", inputs=[*logs, config.data.schema], option="out_dir")


def run_job(config: JobConfig, env: Optional[DistributedEnv] = None) -> Dict:
    """Train and evaluate as configured; rank 0 prints the plan, the curve points and the table, writes
    ``out_dir/results.json``, and appends what it prints to ``out_dir/train.log``."""
    out = claim_run_folder(config)  # every rank: a refusal stops them all, before any collective
    env = env or init_distributed(timeout_s=config.training.collective_timeout_s)
    if not env.is_main:
        return _run_job(config, env)
    with open(out / "train.log", "a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: training into {out} ({env.world_size} process(es))")
        return _run_job(config, env)


def _run_job(config: JobConfig, env: DistributedEnv) -> Dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))))
    started = time.perf_counter()
    if config.finetune is not None:
        config = for_task(config, config.finetune.task)
    job = prepare_job(config, env)
    log, tasks, sharded, pipeline, objective = job.log, job.tasks, job.sharded, job.pipeline, job.objective
    training = config.training
    show = training.progress and env.is_main
    first = job.train_shards[0]  # checked before training: a copied label is worth knowing before hours of it
    warnings = label_copy_warnings(first.dense, first.sparse, first.labels, log.dense_features, job.features)
    gated = next((m for m in sharded.modules() if hasattr(m, "gate_weights")), None)
    train_loader = job.loader("train")
    checkpointer = Checkpointer(checkpoint_dir(config), keep=config.checkpoint.keep)
    global_batch_rows = train_loader.batch_size * train_loader.world_size
    inputs = model_inputs(job)
    save = lambda summary, window, finished=False: save_run(  # noqa: E731
        checkpointer, sharded, job.optimizer, summary, window, global_batch_rows, config_to_dict(config), finished,
        inputs,
    )  # fmt: skip
    before = _start_finetuning(job) if config.finetune is not None else None
    resume = _resume(job, checkpointer, global_batch_rows)
    trigger = CheckpointTrigger(
        save, config.checkpoint.every_steps, config.checkpoint.every_seconds, checkpointer=checkpointer
    )
    board = RunBoard(Path(config.out_dir), training.epochs * len(train_loader)) if env.is_main else None
    try:
        summary = train(
            sharded,
            pipeline,
            train_loader,
            training.epochs,
            show_progress=show,
            task_kinds=tasks.names,
            curve_every=training.curve_every,
            gated_tower=gated,
            resume=resume,
            after_step=trigger,
            schedule=job.schedule,
            on_curve_point=board.curve_point if board is not None else None,
        )
    except NonFiniteLoss as error:
        raise NonFiniteLoss(f"{error}; the last good checkpoint: {checkpointer.latest() or 'none yet'}") from None
    finally:
        trigger.close()
        if board is not None:
            board.flush()
    if summary.stopped:
        raise TrainingStopped(
            f"stopped by SIGTERM after step {summary.steps}; checkpoint {trigger.last_path}; run the same command "
            "again to continue from it"
        )
    if config.checkpoint.at_end:
        save(summary, None, finished=True)
    with GateMonitor(gated) if gated is not None else contextlib.nullcontext() as monitor:
        predictions: Dict[str, np.ndarray] = {}
        metrics = evaluate(
            sharded, job.eval_pipeline, job.loader("test"), tasks.names, show, job.test_users(), predictions
        )
    predictions = _gathered(predictions, env)
    segments = _evaluate_item_segments(job)
    thresholded, threshold_warnings = _threshold_metrics(job, predictions, show)
    cosine = objective.gradient_cosine
    warnings += (monitor.warnings() if monitor else []) + (cosine.warnings() if cosine else []) + leak_warnings(metrics)
    warnings += threshold_warnings

    ceilings = _ceilings(config.data.dir) or {}
    per_task = _headline_first(metrics, ceilings)
    for task, values in thresholded.items():  # after the task's own metrics
        per_task[task].update(values)
    if board is not None:
        board.test_metrics(metrics, summary.steps)
        board.close()
    results = {
        "tasks": per_task,
        **({"finetune": {**config_to_dict(config)["finetune"], "before": before, "after": per_task}} if before else {}),
        "segments": {
            name: {"rows": rows, "tasks": _headline_first(values)} for name, (rows, values) in segments.items()
        },
        "training": {
            "world_size": env.world_size,
            "rows": job.rows(),
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
        out = claim_run_folder(config)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        np.savez(out / "predictions.npz", **predictions)
        print(format_table(per_task))
        for name, segment in results["segments"].items():
            summary_line = ", ".join(f"{t} {headline(v)} {v[headline(v)]:.4f}" for t, v in segment["tasks"].items())
            print(f"{name} items ({segment['rows']:,} test rows): {summary_line}")
        for warning in warnings:
            print(f"warning: {warning}")
        print(
            f"trained {summary.steps} steps at {summary.samples_per_second:,.0f} samples/s on {env.world_size} "
            f"process(es); results in {out / 'results.json'}"
        )
    return results


def evaluate_checkpoint(config: JobConfig, checkpoint: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """The test metrics of a checkpoint (default: the newest in the config's checkpoint folder), at any world size;
    rank 0 prints the table and writes ``out_dir/evaluation.json``."""
    claim_run_folder(config)
    env = init_distributed(timeout_s=config.training.collective_timeout_s)
    job = prepare_job(config, env)
    path = resolve_checkpoint(checkpoint or checkpoint_dir(config))
    if not (path / TRAIN_STATE).exists():
        raise CheckpointError(f"{path}: no checkpoint to evaluate (train first, or pass one)")
    step = load_model_state(path, job.sharded)["step"]  # the weights alone: evaluation needs no optimizer state
    show = config.training.progress and env.is_main
    predictions: Dict[str, np.ndarray] = {}
    metrics = evaluate(
        job.sharded, job.eval_pipeline, job.loader("test"), job.tasks.names, show, job.test_users(), predictions
    )
    thresholded, warnings = _threshold_metrics(job, _gathered(predictions, env), show)  # as training's results
    per_task = _headline_first(metrics, _ceilings(config.data.dir) or {})
    for task, values in thresholded.items():
        per_task[task].update(values)
    if env.is_main:
        out = claim_run_folder(config)
        document = {"checkpoint": str(path), "step": step, "tasks": per_task}
        (out / "evaluation.json").write_text(json.dumps(document, indent=2))
        print(f"{path} (step {step}):\n{format_table(per_task)}")
        for warning in warnings:
            print(f"warning: {warning}")
    return per_task
