"""Job configuration: typed dataclasses loaded from YAML, checked before any work starts.

The sections are in ``sections`` (a leaf: it imports nothing from torchrec_mtl), reading YAML and the typed build in
``load``, every check and the conversions to domain objects in ``check``; this package re-exports their public
names.

An unknown key, a value of the wrong type or an impossible value stops the job with the key's dotted path, the value
and what is allowed. Command-line overrides use the same paths: ``training.epochs=2``, ``model.tower.num_experts=8``
(values are parsed as YAML, so ``training.sharding_types=[row_wise]`` works).

Example::

    >>> config = load_config("configs/mmoe_synthetic.yaml", ["training.epochs=2"])  # doctest: +SKIP
    >>> config.training.epochs  # doctest: +SKIP
    2
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from torchrec_mtl.config.sections import (
    AdversarialConfig,
    AugmentationConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EarlyStoppingConfig,
    EvaluationConfig,
    FinetuneConfig,
    GenerateConfig,
    InteractionConfig,
    JobConfig,
    ModelConfig,
    ObjectiveConfig,
    OrderConfig,
    ProductConfig,
    RetrievalConfig,
    SequenceConfig,
    TableConfig,
    TaskConfig,
    TextConfig,
    TowerConfig,
    TrainingConfig,
)

# Loading and checking import the registries they check against (towers, optimizers: torch), so they are imported
# on first use: the sections and ConfigError stay light, and the command line starts without torch.
_LAZY = {
    "retrieval_features": "check", "synthetic_config": "check", "table_groups": "check", "task_set": "check",
    "config_from_dict": "load", "config_to_dict": "load", "load_config": "load",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'torchrec_mtl.config' has no attribute {name!r}")
    value = getattr(import_module(f"torchrec_mtl.config.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AdversarialConfig",
    "AugmentationConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvaluationConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "InteractionConfig",
    "JobConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OrderConfig",
    "ProductConfig",
    "RetrievalConfig",
    "SequenceConfig",
    "TableConfig",
    "TaskConfig",
    "TextConfig",
    "TowerConfig",
    "TrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "retrieval_features",
    "synthetic_config",
    "table_groups",
    "task_set",
]
