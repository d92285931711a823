"""Checking a built job config: values that type-check but cannot work, against the registries that define what is
allowed (tower kinds, weightings, sharding types and kernels, optimizers, the task relations, the dataset schema), and
the conversions of config sections into the domain's objects (``task_set``, ``retrieval_features``, ``table_groups``,
``synthetic_config``).

The one module of torchrec_mtl.config that imports from the rest of the package; every ConfigError names the key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torchrec_mtl.config.sections import (
    ConfigError,
    DataConfig,
    JobConfig,
    ObjectiveConfig,
    RetrievalConfig,
    SequenceConfig,
    TableConfig,
    TrainingConfig,
)
from torchrec_mtl.data.synthetic import SyntheticConfig
from torchrec_mtl.embedding_tables import table_owner
from torchrec_mtl.modules.item_text import ITEM_TEXT_FEATURE
from torchrec_mtl.modules.sequence import SEQUENCE_KINDS
from torchrec_mtl.modules.interactions import INTERACTIONS, RAW_DENSE_INTERACTIONS
from torchrec_mtl.modules.towers import TOWERS
from torchrec_mtl.precision import PRECISIONS
from torchrec_mtl.schema import DatasetSchema, SchemaError
from torchrec_mtl.tasks import OrderSpec, ProductSpec, TaskSet, TaskSpec
from torchrec_mtl.train.distributed import COMPUTE_KERNELS, SHARDING_TYPES
from torchrec_mtl.train.optimizers import DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS, LR_DECAYS
from torchrec_mtl.weighting import WEIGHTINGS


def task_set(objective: ObjectiveConfig) -> TaskSet:
    """The declared tasks and relations, checked against each other (ValueError names the key)."""
    return TaskSet(
        tasks=tuple(TaskSpec(name, t.kind, t.label, t.weight, t.given, t.ips) for name, t in objective.tasks.items()),
        products=tuple(ProductSpec(name, tuple(p.of), p.weight) for name, p in objective.products.items()),
        orders=tuple(OrderSpec(o.lower, o.upper, o.weight) for o in objective.orders),
    )


def synthetic_config(data: DataConfig) -> Optional[SyntheticConfig]:
    """``data.generate`` as the generator's SyntheticConfig (None when not set); a ValueError names a bad field."""
    if data.generate is None:
        return None
    return SyntheticConfig(**dataclasses.asdict(data.generate))


def _one_of(path: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r}; allowed: {', '.join(allowed)}")


def _check_optimizers_and_placement(training: TrainingConfig) -> None:
    _one_of("training.embedding_optimizer", training.embedding_optimizer, list(EMBEDDING_OPTIMIZERS))
    _one_of("training.dense_optimizer", training.dense_optimizer, list(DENSE_OPTIMIZERS))
    _one_of("training.lr_decay", training.lr_decay, LR_DECAYS)
    _one_of("training.precision", training.precision, list(PRECISIONS))
    for name in ("weight_decay", "gradient_clip_norm", "warmup_steps"):
        if getattr(training, name) < 0:
            raise ConfigError(f"training.{name}: {getattr(training, name)!r}; allowed: >= 0")
    if not 0.0 <= training.min_lr_ratio <= 1.0:
        raise ConfigError(f"training.min_lr_ratio: {training.min_lr_ratio!r}; allowed: 0 to 1")
    if training.memory_budget_gb is not None and training.memory_budget_gb <= 0:
        raise ConfigError(f"training.memory_budget_gb: {training.memory_budget_gb!r}; allowed: > 0 or null")
    for i, sharding_type in enumerate(training.sharding_types or []):
        _one_of(f"training.sharding_types[{i}]", sharding_type, SHARDING_TYPES)
    for key, table in training.tables.items():
        for i, sharding_type in enumerate(table.sharding_types or []):
            _one_of(f"training.tables.{key}.sharding_types[{i}]", sharding_type, SHARDING_TYPES)
        for i, kernel in enumerate(table.compute_kernels or []):
            _one_of(f"training.tables.{key}.compute_kernels[{i}]", kernel, COMPUTE_KERNELS)
        if table.optimizer is not None:
            _one_of(f"training.tables.{key}.optimizer", table.optimizer, list(EMBEDDING_OPTIMIZERS))
        if table.lr is not None and table.lr <= 0:
            raise ConfigError(f"training.tables.{key}.lr: {table.lr!r}; allowed: > 0")


def _check_levers(config: JobConfig) -> None:
    """Adversarial training, augmentation and label noise: their ranges (``_check_lever_names``: the names)."""
    training = config.training
    if training.adversarial.epsilon < 0:
        raise ConfigError(f"training.adversarial.epsilon: {training.adversarial.epsilon!r}; allowed: >= 0 (0: off)")
    if training.adversarial.epsilon > 0 and training.precision == "fp16":
        # the adversarial pass's loss is not scaled as the clean one is; bf16 needs no scaling
        raise ConfigError("training.adversarial.epsilon: adversarial training runs in fp32 or bf16, not under "
                          "training.precision=fp16")  # fmt: skip
    augmentation = training.augmentation
    shares = augmentation.feature_dropout
    for key, p in (shares.items() if isinstance(shares, dict) else [("", shares)]):
        if not 0.0 <= p < 1.0:
            path = "training.augmentation.feature_dropout" + (f".{key}" if key else "")
            raise ConfigError(f"{path}: {p!r}; allowed: 0 <= p < 1")
    if not 0.0 <= augmentation.text_mix <= 1.0:
        raise ConfigError(f"training.augmentation.text_mix: {augmentation.text_mix!r}; allowed: 0 to 1 (0: off)")
    if augmentation.text_mix > 0 and config.model.text is None:
        raise ConfigError("training.augmentation.text_mix: mixes item-text vectors, but model.text is null")
    for label, share in training.label_noise.items():
        if not 0.0 <= share <= 0.5:
            raise ConfigError(f"training.label_noise.{label}: {share!r}; allowed: 0 to 0.5 (a share of rows flipped)")


def _check_lever_names(config: JobConfig, schema: DatasetSchema, features: List[str]) -> None:
    """The features ``training.augmentation.feature_dropout`` names and the labels ``training.label_noise`` flips."""
    shares = config.training.augmentation.feature_dropout
    for key in shares if isinstance(shares, dict) else []:
        if key in schema.lists:
            raise ConfigError(
                f"training.augmentation.feature_dropout.{key}: a list column of {config.data.schema}; feature dropout "
                f"acts on single-ID features only (a list is left as it was read)"
            )
        if key not in features:
            raise ConfigError(
                f"training.augmentation.feature_dropout.{key}: not a feature of {config.data.schema}; allowed: "
                f"{', '.join(features)}"
            )
    binary = [name for name, spec in schema.labels.items() if spec.kind == "binary"]
    for label in config.training.label_noise:
        if label not in binary:
            raise ConfigError(
                f"training.label_noise.{label}: not a binary label of {config.data.schema}; allowed: "
                f"{', '.join(binary)}"
            )


def _check_evaluation(config: JobConfig) -> None:
    """The threshold, and the validation rows that ``best_f1`` chooses it on."""
    threshold, fraction = config.evaluation.threshold, config.data.validation_fraction
    if fraction > 0 and config.data.validation:
        raise ConfigError(
            "data.validation_fraction and data.validation: validation rows come from one of them; drop one"
        )
    has_validation = fraction > 0 or bool(config.data.validation)
    if threshold != "best_f1" and not (isinstance(threshold, float) and 0.0 < threshold < 1.0):
        raise ConfigError(f"evaluation.threshold: {threshold!r}; allowed: a number strictly between 0 and 1, best_f1")
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"data.validation_fraction: {fraction!r}; allowed: 0 <= validation_fraction < 0.5")
    if threshold == "best_f1" and not has_validation:
        raise ConfigError(
            "evaluation.threshold: best_f1 is chosen on validation rows, but data.validation_fraction is 0; set it "
            "(e.g. data.validation_fraction=0.1), give data.validation files, or give a number"
        )
    stopping = config.training.early_stopping
    if stopping is not None:
        if not has_validation:
            raise ConfigError(
                "training.early_stopping: selects on validation rows, but data.validation_fraction is 0; set it "
                "(e.g. data.validation_fraction=0.1) or give data.validation files"
            )
        if stopping.patience < 1 or stopping.min_delta < 0 or stopping.every_steps < 0:
            raise ConfigError(
                f"training.early_stopping: patience {stopping.patience}, min_delta {stopping.min_delta}, every_steps "
                f"{stopping.every_steps}; allowed: patience >= 1, min_delta >= 0, every_steps >= 0"
            )
        task, dot, metric = stopping.metric.partition(".")
        names = [*config.objective.tasks, *config.objective.products]
        if stopping.metric != "mean_auc" and not (dot and metric and task in names):
            raise ConfigError(
                f"training.early_stopping.metric: {stopping.metric!r}; allowed: mean_auc, or <task>.<metric> with a "
                f"task of {', '.join(names)} (e.g. ctr.auc, rating.rmse)"
            )


def table_groups(training: TrainingConfig) -> Dict[str, TableConfig]:
    """``training.tables`` by single feature (a key naming several features applies to each)."""
    return {feature.strip(): table for key, table in training.tables.items() for feature in key.split(",")}


def _check(config: JobConfig) -> None:
    """Values that type-check but cannot work."""

    def positive(path: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{path}: must be positive, got {value!r}")

    try:
        synthetic_config(config.data)
    except ValueError as error:  # the generator's own check of its sizes
        raise ConfigError(f"data.generate: {error}") from None
    training, model = config.training, config.model
    if training.curve_every < 0:
        raise ConfigError(f"training.curve_every: {training.curve_every}; allowed: >= 0")
    for name in ("batch_size", "eval_batch_size", "epochs"):
        positive(f"training.{name}", getattr(training, name))
    positive("training.embedding_lr", training.embedding_lr)
    positive("training.collective_timeout_s", training.collective_timeout_s)
    positive("training.dense_lr", training.dense_lr)
    positive("model.embedding_dim", model.embedding_dim)
    for name in ("num_experts", "num_levels", "num_shared_experts", "num_task_experts", "gate_temperature"):
        positive(f"model.tower.{name}", getattr(model.tower, name))
    if not 0 <= model.tower.expert_dropout < 1:
        raise ConfigError(f"model.tower.expert_dropout: {model.tower.expert_dropout}; allowed: 0 <= expert_dropout < 1")
    if not model.tower.expert_layer_sizes or min(model.tower.expert_layer_sizes) < 1:
        raise ConfigError(
            f"model.tower.expert_layer_sizes: {model.tower.expert_layer_sizes}; allowed: one or more sizes >= 1"
        )
    _check_optimizers_and_placement(training)
    checkpoint = config.checkpoint
    for name in ("every_steps", "every_seconds"):
        if getattr(checkpoint, name) < 0:
            raise ConfigError(f"checkpoint.{name}: {getattr(checkpoint, name)}; allowed: >= 0 (0: off)")
    if checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep: {checkpoint.keep}; allowed: >= 1")
    if checkpoint.resume not in ("auto", "never") and not os.path.isdir(checkpoint.resume):
        raise ConfigError(
            f"checkpoint.resume: {checkpoint.resume!r}; allowed: auto, never, or an existing checkpoint folder"
        )
    if config.finetune is not None:
        from torchrec_mtl.finetune import FREEZABLE

        evaluated = [*config.objective.tasks, *config.objective.products]
        if config.finetune.task not in evaluated:
            raise ConfigError(f"finetune.task: {config.finetune.task!r}; allowed: {', '.join(evaluated)}")
        for i, part in enumerate(config.finetune.freeze):
            _one_of(f"finetune.freeze[{i}]", part, FREEZABLE)
        if not os.path.isdir(config.finetune.checkpoint):
            raise ConfigError(f"finetune.checkpoint: {config.finetune.checkpoint!r} is not a checkpoint folder")
    if model.text is not None and model.text.finetune_layers < 0:
        raise ConfigError(f"model.text.finetune_layers: {model.text.finetune_layers}; allowed: >= 0")
    if not 0.0 <= training.item_id_dropout < 1.0:
        raise ConfigError(f"training.item_id_dropout: {training.item_id_dropout!r}; allowed: 0 <= p < 1")
    _check_levers(config)
    if not 0.0 <= config.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: {config.data.test_fraction!r}; allowed: 0 <= test_fraction < 1")
    if not config.data.train:
        raise ConfigError("data.train: []; expected at least one file or pattern of training logs")
    _check_evaluation(config)
    if not 0.0 <= config.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: {config.data.max_bad_fraction!r}; allowed: 0 to 1")
    if config.data.max_line_bytes < 1:
        raise ConfigError(f"data.max_line_bytes: {config.data.max_line_bytes}; allowed: >= 1")
    if model.tower.kind not in TOWERS:
        raise ConfigError(f"model.tower.kind: {model.tower.kind!r}; allowed: {', '.join(TOWERS)}")
    if model.interaction.kind not in INTERACTIONS:
        raise ConfigError(f"model.interaction.kind: {model.interaction.kind!r}; allowed: {', '.join(INTERACTIONS)}")
    for name in ("num_layers", "low_rank"):
        if getattr(model.interaction, name) < 1:
            raise ConfigError(f"model.interaction.{name}: {getattr(model.interaction, name)}; allowed: >= 1")
    _check_sequence(model.sequence, model.embedding_dim)
    sizes = model.dense_arch_layer_sizes
    if not sizes and model.interaction.kind not in RAW_DENSE_INTERACTIONS:
        raise ConfigError(
            f"model.dense_arch_layer_sizes: []: raw dense features go to {' or '.join(RAW_DENSE_INTERACTIONS)} "
            f"interactions only; {model.interaction.kind} needs sizes ending at model.embedding_dim "
            f"({model.embedding_dim})"
        )
    if sizes and sizes[-1] != model.embedding_dim:
        raise ConfigError(
            f"model.dense_arch_layer_sizes: {sizes}; its last size must equal model.embedding_dim "
            f"({model.embedding_dim}), or [] for the raw dense features (concat, dcn)"
        )
    if config.objective.weighting not in WEIGHTINGS:
        raise ConfigError(f"objective.weighting: {config.objective.weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if config.objective.gradient_cosine_every < 0:
        raise ConfigError(f"objective.gradient_cosine_every: {config.objective.gradient_cosine_every}; allowed: >= 0")
    if config.objective.weighting == "gradnorm" and model.tower.kind == "single_task":
        raise ConfigError(
            "objective.weighting: gradnorm needs shared tower parameters; model.tower.kind is single_task"
        )
    if not config.objective.tasks:
        raise ConfigError("objective.tasks: declare at least one task")
    try:
        tasks = task_set(config.objective)
    except ValueError as error:
        raise ConfigError(f"objective.{error}") from None
    if not any(tasks.weights.values()):
        raise ConfigError("objective: every task and relation has weight 0; nothing would train")
    if os.path.exists(config.data.schema):
        try:
            schema = DatasetSchema.from_yaml(config.data.schema)
        except SchemaError as error:
            raise ConfigError(f"data.schema: {error}") from None
        for name, task in config.objective.tasks.items():
            spec = schema.labels.get(task.label)
            if spec is None:
                raise ConfigError(
                    f"objective.tasks.{name}.label: {task.label!r} is not a label of {config.data.schema}; "
                    f"its labels: {', '.join(schema.labels)}"
                )
            if spec.kind != {"retrieval": "binary"}.get(task.kind, task.kind):
                raise ConfigError(
                    f"objective.tasks.{name}.kind: {task.kind!r}, but {task.label!r} is a {spec.kind} label in "
                    f"{config.data.schema}"
                )
        _check_sequence_features(model.sequence, schema, config.data.schema)
        if tasks.retrieval is not None:
            _check_retrieval(model.retrieval, schema, config.data.schema)
            _check_retrieval_reads_no_sequence(model, schema)
        features = [*schema.categorical, *([ITEM_TEXT_FEATURE] if model.text is not None else [])]
        for key in config.training.tables:
            for feature in key.split(","):
                if feature.strip() not in features:
                    raise ConfigError(
                        f"training.tables.{key}: {feature.strip()!r} is not a categorical feature of "
                        f"{config.data.schema}; allowed: {', '.join(features)}"
                    )
                owner = table_owner(feature.strip(), schema.lists)
                if owner != feature.strip():
                    raise ConfigError(
                        f"training.tables.{key}: list {feature.strip()!r} looks up the table of {owner!r} (its "
                        f"shares in {config.data.schema}); set the table's options under {owner!r}"
                    )
        _check_lever_names(config, schema, features)
        if model.text is not None and schema.item_text_key is None:
            raise ConfigError(
                f"model.text: the schema {config.data.schema} declares no item_text_key (the column whose items the "
                f"items file describes); set model.text=null to train without item text"
            )


def _check_sequence(sequence: SequenceConfig, embedding_dim: int) -> None:
    """``model.sequence``'s values that need no schema: the kind, its sizes, features only with a kind."""
    _one_of("model.sequence.kind", sequence.kind, SEQUENCE_KINDS)
    if sequence.kind == "none":
        if sequence.features:
            raise ConfigError(
                f"model.sequence.features: {sequence.features} are attended over only with model.sequence.kind din "
                f"or bst (it is none: every list is pooled); set the kind or drop the features"
            )
        return
    if not sequence.features:
        raise ConfigError(f"model.sequence.features: none; kind {sequence.kind} attends over at least one list column")
    if len(set(sequence.features)) != len(sequence.features):
        raise ConfigError(f"model.sequence.features: {sequence.features} names a column twice")
    if sequence.kind == "din" and (not sequence.attention_layer_sizes or min(sequence.attention_layer_sizes) < 1):
        raise ConfigError(
            f"model.sequence.attention_layer_sizes: {sequence.attention_layer_sizes}; allowed: one or more sizes >= 1"
        )
    if sequence.kind == "bst":
        for name in ("num_heads", "num_layers"):
            if getattr(sequence, name) < 1:
                raise ConfigError(f"model.sequence.{name}: {getattr(sequence, name)}; allowed: >= 1")
        width = len(sequence.features) * embedding_dim  # the per-position width: the features' embeddings side by side
        if width % sequence.num_heads:
            raise ConfigError(
                f"model.sequence.num_heads: {sequence.num_heads} does not divide the width attended over, {width} "
                f"({len(sequence.features)} feature(s) x model.embedding_dim {embedding_dim})"
            )
        if not 0.0 <= sequence.dropout < 1.0:
            raise ConfigError(f"model.sequence.dropout: {sequence.dropout!r}; allowed: 0 <= dropout < 1")


def _check_sequence_features(sequence: SequenceConfig, schema: DatasetSchema, schema_path: str) -> None:
    """Each sequence feature is a list column of the schema sharing a single-ID column (its query), all of one
    ``max_length`` (aligned position by position)."""
    for i, feature in enumerate(sequence.features):
        spec = schema.lists.get(feature)
        if spec is None:
            raise ConfigError(
                f"model.sequence.features[{i}]: {feature!r} is not a list column of {schema_path}; its lists: "
                f"{', '.join(schema.lists) or 'none'}"
            )
        if spec.shares is None:
            raise ConfigError(
                f"model.sequence.features[{i}]: list {feature!r} of {schema_path} shares no column; a sequence "
                f"feature needs shares: <single-ID column> (that column's ID is the candidate's query)"
            )
    lengths = {feature: schema.lists[feature].max_length for feature in sequence.features}
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            f"model.sequence.features: {lengths} (max_length in {schema_path}); features attended over together are "
            f"aligned position by position and need one max_length"
        )


def _check_retrieval_reads_no_sequence(model: Any, schema: DatasetSchema) -> None:
    """The two-tower arch reads one pooled vector per feature: a sequence feature has none."""
    for side, features in zip(("user", "item"), retrieval_features(model.retrieval, schema)):
        attended = [f for f in features if f in model.sequence.features]
        if attended:
            raise ConfigError(
                f"model.retrieval.{side}_features: {attended} are sequence features (model.sequence.features), "
                f"attended over rather than pooled; the towers read pooled features"
            )


def retrieval_features(retrieval: RetrievalConfig, schema: DatasetSchema) -> Tuple[List[str], List[str]]:
    """The (user, item) tower features: as configured, or the schema's user_id and item_id columns."""
    user = retrieval.user_features or ([schema.user_id] if schema.user_id else [])
    item = retrieval.item_features or ([schema.item_id] if schema.item_id else [])
    return user, item


def _check_retrieval(retrieval: RetrievalConfig, schema: DatasetSchema, schema_path: str) -> None:
    for side in ("user", "item"):
        features = retrieval_features(retrieval, schema)[side == "item"]
        if not features:
            raise ConfigError(
                f"model.retrieval.{side}_features: none given and the schema {schema_path} names no {side}_id column"
            )
        unknown = [f for f in features if f not in schema.categorical]
        if unknown:
            raise ConfigError(
                f"model.retrieval.{side}_features: {unknown} are not categorical features of {schema_path}; "
                f"allowed: {', '.join(schema.categorical)}"
            )
        if side == "item" and features[0] in schema.lists:
            raise ConfigError(
                f"model.retrieval.item_features: the first, {features[0]!r}, is the item the in-batch softmax counts "
                f"and must hold one ID per row; it is a list column of {schema_path}"
            )
    for name in ("dim", "temperature"):
        if getattr(retrieval, name) <= 0:
            raise ConfigError(f"model.retrieval.{name}: must be positive, got {getattr(retrieval, name)!r}")
    if retrieval.popularity_correction < 0:
        raise ConfigError(f"model.retrieval.popularity_correction: {retrieval.popularity_correction!r}; allowed: >= 0")
