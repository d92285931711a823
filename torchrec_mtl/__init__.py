"""torchrec_mtl: multi-task recommendation models on TorchRec.

The public API, imported on first use (so ``import torchrec_mtl`` and its torch-free parts, such as the report, do
not load torch):

Example::

    >>> import torch, torchrec_mtl
    >>> tower = torchrec_mtl.MMoE(in_features=32, task_names=["ctr", "cvr"], num_experts=2, expert_layer_sizes=[8])
    >>> sorted(tower(torch.randn(4, 32)))
    ['ctr', 'cvr']
"""

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("torchrec-mtl")
except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0.0.0+source"

# name -> the module that defines it
_EXPORTS = {
    # towers and the other modules a TorchRec model can take alone
    "MMoE": "modules.towers", "PLE": "modules.towers", "CGC": "modules.towers", "SharedBottom": "modules.towers",
    "SingleTask": "modules.towers", "TOWERS": "modules.towers", "INTERACTIONS": "modules.interactions",
    "ItemTextArch": "modules.item_text", "TwoTowerArch": "modules.two_tower", "InBatchSoftmax": "modules.two_tower",
    "DINAttention": "modules.sequence", "BSTEncoder": "modules.sequence",
    # the model, its batch and the objective
    "MultiTaskModel": "model", "MultiTaskTrain": "model", "MultiTaskBatch": "data.batch",
    "MultiTaskObjective": "tasks", "TaskSpec": "tasks", "ProductSpec": "tasks", "OrderSpec": "tasks",
    "TaskSet": "tasks", "esmm_tasks": "tasks", "KINDS": "task_kinds", "TaskKind": "task_kinds",
    "register_kind": "task_kinds", "WEIGHTINGS": "weighting",
    # jobs: config in, results out
    "load_config": "config", "build_model": "build", "prepare_job": "run", "run_job": "run",
    "evaluate_checkpoint": "run", "load_trained": "inference", "export": "inference",
}  # fmt: skip

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torchrec_mtl' has no attribute {name!r}")
    value = getattr(import_module(f"torchrec_mtl.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list:
    return sorted([*globals(), *_EXPORTS])
