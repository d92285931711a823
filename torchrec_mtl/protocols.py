"""The interfaces the loop, the diagnostics and the run find parts of a model by, in place of attribute probes.

Each is a ``runtime_checkable`` Protocol: a module satisfies it by having the method or attribute, as the towers,
the objective and the weightings do; ``find`` returns the first submodule that satisfies one.

Example::

    >>> from torchrec_mtl.modules.towers import MMoE
    >>> isinstance(MMoE(8, ["ctr", "cvr"], num_experts=2, expert_layer_sizes=[4]), Gated)
    True
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Protocol, Type, TypeVar, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Gated(Protocol):
    """A tower with softmax gates over experts (MMoE, PLE): each task's gate weights for a batch of inputs."""

    def gate_weights(self, features: torch.Tensor) -> Dict[str, torch.Tensor]: ...


@runtime_checkable
class ExposesTaskGates(Protocol):
    """A gated tower whose per-task gates can be watched as they run: each module returns, for its task, the weights
    ``gate_weights`` reports (a ``Gate``, called as ``gate(features, drop_experts)``), so a monitor needs no second pass
    through the tower."""

    def task_gates(self) -> Dict[str, nn.Module]: ...


@runtime_checkable
class ReportsTerms(Protocol):
    """An objective that keeps the last forward's loss terms (detached), to name a non-finite one."""

    last_terms: Dict[str, torch.Tensor]


@runtime_checkable
class ReportsWeights(Protocol):
    """A loss weighting that reports each term's multiplier."""

    def effective_weights(self) -> Dict[str, float]: ...


@runtime_checkable
class NeedsSharedParameters(Protocol):
    """A weighting or diagnostic that measures gradients on the tower's shared parameters."""

    def attach(self, parameters: Iterable[nn.Parameter]) -> None: ...


@runtime_checkable
class PlansSteps(Protocol):
    """A part that samples some of a run's training steps (the objective's gradient cosine): the training loop tells
    it the run's length (at most ``total_steps``) and the steps done before it starts (a resume)."""

    def plan_steps(self, total_steps: int, steps_done: int) -> None: ...


P = TypeVar("P")


def find(model: nn.Module, protocol: Type[P]) -> Optional[P]:
    """The first submodule of ``model`` (itself included, in ``modules()`` order) that satisfies ``protocol``."""
    return next((module for module in model.modules() if isinstance(module, protocol)), None)
