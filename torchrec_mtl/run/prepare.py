"""Everything a run trains and evaluates, prepared: the data (generated and preprocessed when needed), the item text
(encoded when needed), this rank's shards and the sharded model with its pipelines and optimizers.

Example::

    >>> job = prepare_job(load_config("configs/mmoe_synthetic.yaml"), init_distributed())  # doctest: +SKIP
    >>> job.rows(), job.loader("train").batch_size  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist, TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_mtl.build import build_item_text, build_model, build_retrieval_loss, seed_everything
from torchrec_mtl.config import ConfigError, JobConfig, retrieval_features, synthetic_config, table_groups, task_set
from torchrec_mtl.data import synthetic
from torchrec_mtl.data.augment import Augmentation
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.prepare import MissingInputError, prepare_shards, resolve_files, shards_dir
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.data.splits import flipped_labels, shuffled_labels, split_validation, with_item_text_rows
from torchrec_mtl.finetune import freeze
from torchrec_mtl.model import MultiTaskTrain
from torchrec_mtl.outputs import claim_folder
from torchrec_mtl.precision import Precision
from torchrec_mtl.modules.item_text import ITEM_TEXT_FEATURE, ITEM_TEXT_TABLE, ItemTextArch
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.tasks import MultiTaskObjective, TaskSet
from torchrec_mtl.text.cache import encode_items_file
from torchrec_mtl.text.table import ItemTextTable
from torchrec_mtl.train.distributed import DistributedEnv, TableOptions, load_table_weights, shard_model
from torchrec_mtl.train.loop import make_eval_pipeline, make_pipeline
from torchrec_mtl.train.optimizers import LearningRateSchedule
from torchrec_mtl.embedding_tables import table_of


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
            meta = synthetic.generate(synthetic_config(config.data), config.data.dir)
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

        encoder = TextEncoder(text.encoder, pooling=text.pooling, device=env.device)  # rank 0's GPU on a GPU run
        summary = encode_items_file(items, cache, encoder, progress=config.training.progress)
        print(
            f"item text: {summary['items']:,} items, {summary['encoded']:,} encoded, {summary['reused']:,} reused "
            f"from {cache}",
            flush=True,
        )
    dist.barrier()
    return ItemTextTable.load(items, cache, DatasetSchema.from_yaml(config.data.schema).categorical_format)


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
    features: List[str]  # the KJT keys: the categorical features (lists included), then ITEM_TEXT_FEATURE with text
    text_table: Optional[ItemTextTable]
    objective: MultiTaskObjective
    sharded: DistributedModelParallel
    optimizer: KeyedOptimizer  # the embedding (fused) and dense optimizers combined
    pipeline: TrainPipelineSparseDist
    eval_pipeline: EvalPipelineSparseDist
    schedule: Optional[LearningRateSchedule]  # every learning rate, by step
    precision: Precision  # training.precision on the run's device (fp16: its GradScaler)
    retrieval_features: Optional[Tuple[List[str], List[str]]] = None  # the two towers' features
    # training rows held out of train_shards (data.validation_fraction), for choosing thresholds
    validation_shards: List[EncodedLog] = dataclasses.field(default_factory=list)

    def rows(self) -> Dict[str, int]:
        """Rows per split as trained and evaluated: ``train`` (less the validation rows), ``validation`` (only when
        rows are held out) and ``test``."""
        validation = sum(len(shard) for shard in self.validation_shards)
        held = validation if self.config.data.validation_fraction > 0 else 0  # else: files of their own
        return {"train": self.log.rows("train") - held, **({"validation": validation} if validation else {}),
                "test": self.log.rows("test")}  # fmt: skip

    def model_inputs(self) -> Dict[str, Any]:
        """What a checkpoint needs beside its tensors to rebuild the model (JSON; torchrec_mtl.inference reads it)."""
        text = self.text_table
        sequence = self.config.model.sequence
        attended = list(sequence.features) if sequence.kind != "none" else []
        return {
            "features": list(self.features),
            "table_sizes": dict(self.log.table_sizes),
            "lists": {name: dataclasses.asdict(spec) for name, spec in self.log.lists.items()},
            "num_dense": len(self.log.dense_features),
            "dense_features": list(self.log.dense_features),
            "offsets": dict(self.objective.offsets),
            "item_text": {"num_items": text.num_items, "dim": text.dim} if text is not None else None,
            "retrieval": self.retrieval_features,
            # the features attended over (model.sequence): the serving paths check their alignment
            # (inference.sequence_features)
            "sequences": {
                name: {"kind": sequence.kind, "query": self.log.lists[name].shares,
                       "max_length": self.log.lists[name].max_length}
                for name in attended
            },  # fmt: skip
        }

    def test_users(self) -> Optional[np.ndarray]:
        """The raw user key of each test row (for GAUC), when the schema names a user column."""
        user_column = self.log.metadata.get("user_id")
        if user_column is None:
            return None
        return np.concatenate([shard.keys[user_column] for shard in self.test_shards])

    @property
    def single_id_features(self) -> List[str]:
        """The features of one ID per row (the shards' sparse columns, in order): ``features`` less the lists."""
        return [f for f in self.features if f not in self.log.lists]

    def augmentation(self) -> Optional[Augmentation]:
        """``training.augmentation`` over this job's single-ID features (None when off; lists are left alone)."""
        augment = self.config.training.augmentation
        return Augmentation.from_config(
            self.single_id_features, augment.feature_dropout, augment.text_mix,
            self.config.training.seed if augment.seed is None else augment.seed, self.log.single_id_features,
            ITEM_TEXT_FEATURE,
        )  # fmt: skip

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
                pin_memory=self.pin_memory,
                augmentation=self.augmentation(),
            )  # fmt: skip
        if split == "validation" and not self.validation_shards:
            raise ConfigError(
                "data.validation_fraction: no validation rows; set it > 0, or give data.validation files"
            )
        if split not in ("validation", "test"):
            raise ValueError(f"split: {split!r}; allowed: train, validation, test")
        return BatchLoader(
            self.validation_shards if split == "validation" else self.test_shards, self.features,
            training.eval_batch_size, env.rank, env.world_size, shuffle=False, pad_tail=True,
            pin_memory=self.pin_memory,
        )  # fmt: skip

    @property
    def pin_memory(self) -> bool:
        """Whether batches are page-locked: for a GPU run (BatchLoader)."""
        return self.env.device.type == "cuda"


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
    validation_files = log.split("validation") if "validation" in log.splits else []
    training = config.training
    if training.shuffle_labels:
        train_shards = shuffled_labels(train_shards, training.seed)
    train_shards = flipped_labels(train_shards, training.label_noise, training.seed)

    features = log.categorical_features
    text_table = None
    if config.model.text is not None:
        text_table = load_item_text(config, env, log)
        train_shards, test_shards, validation_files = (
            with_item_text_rows(shards, text_table, log.metadata["item_text_key"])
            for shards in (train_shards, test_shards, validation_files)
        )
        features = [*features, ITEM_TEXT_FEATURE]
    train_shards, validation_shards = split_validation(train_shards, config.data.validation_fraction, training.seed)
    validation_shards = validation_shards or validation_files

    seed_everything(training.seed)
    table_sizes = log.table_sizes
    if env.is_main:
        validation = sum(len(shard) for shard in validation_shards)
        held = validation if config.data.validation_fraction > 0 else 0  # else: files of their own
        print(
            f"{log.rows('train') - held:,} train" + (f", {validation:,} validation" if validation else "")
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
        retrieval_features=two_tower_features, lists=log.lists,
    )  # fmt: skip
    frozen_parts = config.finetune.freeze if config.finetune is not None else []
    freeze(model, frozen_parts)
    offsets = {t.name: log.label_mean("train", t.label) or 0.0 for t in tasks.tasks if t.kind == "regression"}
    retrieval_loss, item_feature = None, None
    if two_tower_features is not None:
        retrieval_loss, item_feature = build_retrieval_loss(
            config, tasks.retrieval.label, train_shards, features, two_tower_features, table_sizes
        )
    try:
        precision = Precision(training.precision, env.device)
    except ValueError as error:  # bf16 on a GPU without it
        raise ConfigError(f"training.precision: {error}") from None
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
            MultiTaskTrain(
                model, objective, precision, training.adversarial.epsilon, training.augmentation.text_mix > 0
            ),
            env,
            training.embedding_optimizer,
            training.embedding_lr,
            training.dense_lr,
            training.sharding_types,
            tables={
                table_of(feature, log.lists): TableOptions(t.sharding_types, t.compute_kernels, t.optimizer, t.lr)
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
        make_pipeline(sharded, optimizer, env.device, precision.scaler), make_eval_pipeline(sharded, env.device), None,
        precision,
    )  # fmt: skip
    job.validation_shards = validation_shards
    job.retrieval_features = two_tower_features
    job.schedule = LearningRateSchedule(
        optimizer, training.warmup_steps, training.epochs * len(job.loader("train")), training.lr_decay,
        training.min_lr_ratio,
    )  # fmt: skip
    return job


def checkpoint_dir(config: JobConfig) -> Path:
    return Path(config.checkpoint.dir or Path(config.out_dir) / "checkpoints")


def check_inputs(config: JobConfig) -> None:
    """Every file the run will read is there, before any work: the schema (and that it parses), the logs (unless
    they are to be generated), the items file and the text encoder's folder, a checkpoint to resume or fine-tune.
    A missing one is a ConfigError naming its key, the path and the folder it was resolved against."""
    data = config.data

    def missing(key: str, path: str | Path, what: str) -> ConfigError:
        return ConfigError(f"{key}: {path} does not exist ({what}; a relative path in a config file resolves "
                           f"against that file's folder, on the command line against {Path.cwd()})")  # fmt: skip

    if not Path(data.schema).is_file():
        raise missing("data.schema", data.schema, "a dataset schema, e.g. one of configs/datasets/")
    DatasetSchema.from_yaml(data.schema)  # a SchemaError names the file and the key
    if data.generate is None:
        if not Path(data.dir).is_dir():
            raise missing("data.dir", data.dir, "the folder of the logs")
        try:
            resolve_files(data)
        except MissingInputError as error:
            raise ConfigError(str(error)) from None
        text = config.model.text
        if text is not None and not (Path(data.dir) / text.items).is_file():
            raise missing("model.text.items", Path(data.dir) / text.items, "an items file: item_id, description")
    if config.model.text is not None and config.model.text.encoder and not Path(config.model.text.encoder).is_dir():
        raise missing("model.text.encoder", config.model.text.encoder, "a local BERT-family model folder")
    if config.checkpoint.resume not in ("auto", "never") and not Path(config.checkpoint.resume).exists():
        raise missing("checkpoint.resume", config.checkpoint.resume, "a checkpoint to continue from")
    if config.finetune is not None and not Path(config.finetune.checkpoint).exists():
        raise missing("finetune.checkpoint", config.finetune.checkpoint, "the joint checkpoint to fine-tune")


def claim_run_folder(config: JobConfig) -> Path:
    """``out_dir``, created and marked, or OutputError when it holds files of others or the run's data."""
    try:
        logs = [path for paths in resolve_files(config.data).values() for path in paths]
    except MissingInputError:  # a log still to be generated; the data folder itself stands for it
        logs = [config.data.dir]
    return claim_folder(config.out_dir, "run", inputs=[*logs, config.data.schema], option="out_dir")
