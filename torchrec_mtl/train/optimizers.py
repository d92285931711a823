"""The optimizers of a sharded model: fused embedding optimizers per table group, the optimizers of data-parallel
tables, the dense optimizer (torchrec's KeyedOptimizerWrapper, with torchrec's GradientClippingOptimizer when
clipping), and one learning-rate schedule over all of them.

Embedding tables train inside backward (``apply_optimizer_in_backward``; torchrec fuses the tables that share an
optimizer and its settings into one FBGEMM kernel), so each table group may have its own optimizer and learning rate.
A data-parallel table (torchrec's dense kernel: every rank holds it whole, and its gradient is all-reduced like a
dense parameter's) trains outside backward with its own optimizer and rate (``table_optimizers``), as torch's fused
implementation (one kernel over all of a group's tensors, CPU and GPU: an Adam step over 7.2M table parameters took
4.3 ms against 20.9 ms for torch's default on 2 threads); that is how Adam trains tables on CPU, where FBGEMM's
kernels lack it.

Example::

    >>> specs = embedding_optimizer_specs(["C1", "C2"], "rowwise_adagrad", 0.05, {"C2": ("adagrad", 0.01)})
    >>> specs["t_C2"]
    ('adagrad', 0.01)
    >>> LearningRateSchedule.multiplier_at(50, warmup_steps=100, total_steps=1000, decay="cosine", min_ratio=0.1)
    0.51
"""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_mtl.embedding_tables import NO_LISTS, table_of, table_owner
from torchrec_mtl.schema import ListSpec

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
# FBGEMM's CPU kernels (fbgemm-gpu-cpu 1.8.0) fuse only these; Adam runs fused on GPUs, and on CPU in data-parallel
# tables (``table_optimizers``)
FUSED_ON_CPU = ("rowwise_adagrad", "adagrad", "sgd")
DENSE_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
FUSED_IMPLEMENTATIONS = (torch.optim.Adam, torch.optim.Adagrad, torch.optim.SGD)  # torch's, of EMBEDDING_OPTIMIZERS
LR_DECAYS = ("constant", "linear", "cosine")


def embedding_optimizer_specs(
    features: Sequence[str],
    default_optimizer: str,
    default_lr: float,
    overrides: Optional[Mapping[str, Tuple[str, float]]] = None,
    lists: Mapping[str, ListSpec] = NO_LISTS,
) -> Dict[str, Tuple[str, float]]:
    """Table name -> (optimizer, learning rate): the default for every feature's table (``lists``: the list
    features, which may share another's table: torchrec_mtl.embedding_tables), except ``overrides`` (feature ->
    (optimizer, lr); a shared table takes its owner's)."""
    overrides = dict(overrides or {})
    return {table_of(f, lists): overrides.get(table_owner(f, lists), (default_optimizer, default_lr)) for f in features}


def apply_embedding_optimizers(
    tables: Mapping[str, nn.Parameter],
    specs: Mapping[str, Tuple[str, float]],
    default: Tuple[str, float],
    data_parallel: Collection[str] = (),
) -> None:
    """Attach each table's optimizer to run inside backward (before sharding, so the sharder fuses it); tables
    without a spec (e.g. the item-text table) get ``default``. ``data_parallel`` tables (every optimizer FBGEMM's
    kernels on the run's device cannot fuse, among them) get none: they train outside backward
    (``table_optimizers``)."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    for name, weight in tables.items():
        if name not in data_parallel:
            optimizer, lr = specs.get(name, default)
            apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[optimizer], [weight], {"lr": lr})


def _torch_optimizer(kind: type, group: Any, **settings: Any) -> torch.optim.Optimizer:
    """``kind`` over ``group``, as torch's fused implementation where it has one (torchrec's RowWiseAdagrad has
    none)."""
    return kind(group, fused=True, **settings) if kind in FUSED_IMPLEMENTATIONS else kind(group, **settings)


def table_optimizers(
    params: Mapping[str, nn.Parameter], table_of_param: Mapping[str, str], specs: Mapping[str, Tuple[str, float]],
    default: Tuple[str, float],
) -> List[KeyedOptimizer]:
    """One optimizer per (optimizer, learning rate) over the data-parallel tables' weights (``params``: parameter
    name -> weight; ``table_of_param``: parameter name -> its table's name), each table at its ``specs`` entry or
    ``default``."""
    groups: Dict[Tuple[str, float], Dict[str, nn.Parameter]] = {}
    for name, weight in params.items():
        groups.setdefault(specs.get(table_of_param[name], default), {})[name] = weight

    def wrapped(optimizer: str, lr: float, group: Dict[str, nn.Parameter]) -> KeyedOptimizer:
        return KeyedOptimizerWrapper(group, lambda g: _torch_optimizer(EMBEDDING_OPTIMIZERS[optimizer], g, lr=lr))

    return [wrapped(optimizer, lr, group) for (optimizer, lr), group in groups.items()]


def dense_optimizer(
    params: Mapping[str, nn.Parameter],
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip_norm: float = 0.0,
) -> KeyedOptimizer:
    """The optimizer of the replicated (data-parallel) parameters other than tables; gradients are clipped to
    ``clip_norm`` (total L2 norm) first when it is > 0."""
    if name not in DENSE_OPTIMIZERS:
        raise ValueError(f"dense optimizer {name!r}; allowed: {', '.join(DENSE_OPTIMIZERS)}")
    # torch's default implementation: the fused one differs in the last bits (2e-7 after 50 steps), which would move
    # every figure trained before it, for a step over the tower's parameters that is small beside the tables'
    optimizer = KeyedOptimizerWrapper(
        dict(params), lambda group: DENSE_OPTIMIZERS[name](group, lr=lr, weight_decay=weight_decay)
    )
    if clip_norm > 0:
        return GradientClippingOptimizer(optimizer, clipping=GradientClipping.NORM, max_gradient=clip_norm)
    return optimizer


class LearningRateSchedule:
    """Scales every param group's own learning rate (embedding tables' and dense) by one multiplier of the step:
    a linear warmup to 1 over ``warmup_steps``, then ``constant``, or a ``linear`` or ``cosine`` decay to
    ``min_ratio`` at ``total_steps``.

    torchrec's WarmupOptimizer sets one learning rate for every group, which would erase per-table rates, so the
    schedule scales each group's base rate instead. It holds no state of its own: ``set_step`` after each step
    (and after a resume) sets the rates from the step count, which the checkpoint already holds.
    """

    def __init__(
        self,
        optimizer: KeyedOptimizer,
        warmup_steps: int = 0,
        total_steps: int = 0,
        decay: str = "constant",
        min_ratio: float = 0.0,
    ) -> None:
        if decay not in LR_DECAYS:
            raise ValueError(f"decay {decay!r}; allowed: {', '.join(LR_DECAYS)}")
        self.groups = list(optimizer.param_groups)
        self.base_lrs = [float(group["lr"]) for group in self.groups]
        self.warmup_steps, self.total_steps, self.decay, self.min_ratio = warmup_steps, total_steps, decay, min_ratio
        self.set_step(0)

    @staticmethod
    def multiplier_at(step: int, warmup_steps: int, total_steps: int, decay: str, min_ratio: float) -> float:
        """The multiplier for the update that follows ``step`` completed steps."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return round(min_ratio + (1.0 - min_ratio) * shape, 12)

    def multiplier(self, step: int) -> float:
        return self.multiplier_at(step, self.warmup_steps, self.total_steps, self.decay, self.min_ratio)

    def set_step(self, step: int) -> float:
        """Set every group's rate for the update after ``step`` steps; returns the multiplier."""
        multiplier = self.multiplier(step)
        for group, base in zip(self.groups, self.base_lrs):
            group["lr"] = base * multiplier
        return multiplier

    @property
    def learning_rates(self) -> List[float]:
        return [float(group["lr"]) for group in self.groups]
