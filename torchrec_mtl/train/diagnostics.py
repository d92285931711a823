"""What the tower's gates did, and warnings a user should not miss.

``GateMonitor`` watches any tower with a ``gate_weights(features)`` method (MMoE, PLE) while it runs, through
forward hooks (on its task gates where it exposes them), so it works inside TorchRec's pipelines without touching
them. Per task it reports the mean gate entropy (in nats; ``log(num_experts)`` means "uses every expert equally", 0
means "always one expert") and each expert's mean weight. An expert whose weight stays under ``collapsed_below`` for
every task is reported as collapsed. Under several processes each rank sees its own rows; the job reports rank 0's.

Example::

    >>> tower = MMoE(in_features=8, task_names=["ctr", "cvr"], num_experts=3, expert_layer_sizes=[4])
    >>> with GateMonitor(tower) as monitor:
    ...     _ = tower(torch.randn(16, 8))
    >>> sorted(monitor.summary()["ctr"])
    ['entropy', 'usage']
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from torchrec_mtl.results import unreliable
from torchrec_mtl.weighting import flat_gradient
from torchrec_mtl.protocols import ExposesTaskGates, Gated

# A task whose AUC is this close to 1 is more likely fed its own label than learned.
LEAK_AUC = 0.999


# what a collapse warning suggests, mildest first (docs/tasks.md, "Experts and gates")
REMEDIES = (
    "try model.tower.expert_dropout=0.1 (experts left out of a row's mix at random in training), "
    "model.tower.gate_temperature=2 (flatter gates), fewer experts, or a lower training.dense_lr"
)


class GateMonitor:
    """Accumulates gate entropy and expert usage per task over the rows the tower sees while the monitor is open.

    A tower that exposes its task gates (``ExposesTaskGates``: MMoE, PLE) is watched through a forward hook on each,
    which reads the weights the forward computed; the weights with expert dropout are computed again without it (the
    gate alone). Any other tower with ``gate_weights`` is watched through a hook on the tower that computes the weights
    again from its input. For a PLE of two levels that pass (every level below the last again) cost +22% of the tower's
    forward and backward, on every step of the curve's windows (half of all steps at the defaults); the gates' hooks
    cost +0.7% (MMoE 4 experts [256, 128]: +2.5% and +0.7%; batches of 1024 rows, 2 threads).

    Args:
        tower: a module with ``gate_weights(features) -> {task: [B, experts]}``.
        collapsed_below: an expert whose mean weight is below this for every task is reported as collapsed.
    """

    FOLD_ROWS = 1 << 16  # rows of a task's gate weights kept before they are summed (4 experts: 1 MiB in float32)

    def __init__(self, tower: nn.Module, collapsed_below: float = 0.01) -> None:
        if not isinstance(tower, Gated):
            raise TypeError(f"{type(tower).__name__} has no gates (gate_weights)")
        self.tower, self.collapsed_below = tower, collapsed_below
        self.task_rows: Dict[str, int] = {}
        self.entropy: Dict[str, torch.Tensor] = {}
        self.usage: Dict[str, torch.Tensor] = {}
        self._kept: Dict[str, List[torch.Tensor]] = {}  # batches of weights not yet folded into the sums
        self._kept_rows: Dict[str, int] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    @property
    def rows(self) -> int:
        """Rows seen (each task's gate sees every row the tower does)."""
        return max(self.task_rows.values(), default=0)

    def __enter__(self) -> "GateMonitor":
        if isinstance(self.tower, ExposesTaskGates):
            # a Gate's softmax (its child ``weighing``) runs whether the gate computed its own logits or MMoE's
            # fused product did; another gate module is hooked itself
            self._handles = [
                getattr(gate, "weighing", gate).register_forward_hook(functools.partial(self._observe_gate, task))
                for task, gate in self.tower.task_gates().items()
            ]
        else:
            self._handles = [self.tower.register_forward_hook(self._observe_tower)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _observe_gate(self, task: str, gate: nn.Module, inputs, weights: torch.Tensor) -> None:
        features = inputs[0]  # the gate's logits (GateWeights) or its input (another gate module)
        if not isinstance(features, torch.Tensor):  # a symbolic trace of the model (TorchRec's pipeline does one)
            return
        if len(inputs) > 1 and inputs[1] and getattr(gate, "expert_dropout", 0.0) > 0:
            weights = gate.forward(features)  # the weights without expert dropout (forward: not through this hook)
        self._add(task, weights)

    @torch.no_grad()
    def _observe_tower(self, module: nn.Module, inputs, output) -> None:
        features = inputs[0]
        if not isinstance(features, torch.Tensor):  # a symbolic trace of the model (TorchRec's pipeline does one)
            return
        for task, weights in module.gate_weights(features).items():
            self._add(task, weights)

    def _add(self, task: str, weights: torch.Tensor) -> None:
        """One batch of a task's gate weights [B, experts], kept until ``FOLD_ROWS`` rows of them are folded into its
        entropy and usage sums at once: the sums' few small operations cost more than a gate's forward, a batch at a
        time (about 0.2 ms a step, ~0.4% of training time at the defaults)."""
        self._kept.setdefault(task, []).append(weights.detach())
        self.task_rows[task] = self.task_rows.get(task, 0) + weights.shape[0]
        self._kept_rows[task] = self._kept_rows.get(task, 0) + weights.shape[0]
        if self._kept_rows[task] >= self.FOLD_ROWS:
            self._fold(task)

    def _fold(self, task: str) -> None:
        """The kept batches of ``task``'s gate weights into its entropy and usage sums."""
        if not self._kept.get(task):
            return
        weights = torch.cat(self._kept.pop(task)).double()
        self._kept_rows[task] = 0
        entropy = -(weights * weights.clamp(min=1e-12).log()).sum(dim=-1).sum()
        self.entropy[task] = self.entropy.get(task, 0.0) + entropy
        self.usage[task] = self.usage.get(task, 0.0) + weights.sum(dim=0)

    def summary(self) -> Dict[str, Dict]:
        """task -> {"entropy": mean gate entropy (nats), "usage": mean weight of each expert}."""
        for task in list(self._kept):
            self._fold(task)
        return {
            task: {
                "entropy": float(self.entropy[task]) / self.task_rows[task],
                "usage": (self.usage[task] / self.task_rows[task]).tolist(),
            }
            for task in self.usage
        }

    def warnings(self) -> List[str]:
        summary = self.summary()
        if not summary:
            return []
        num_experts = len(next(iter(summary.values()))["usage"])
        messages = []
        for expert in range(num_experts):
            usage = {task: values["usage"][expert] for task, values in summary.items()}
            if all(value < self.collapsed_below for value in usage.values()):
                shown = ", ".join(f"{task} {value:.4f}" for task, value in usage.items())
                messages.append(
                    f"expert {expert} collapsed: mean gate weight below {self.collapsed_below} for every task ({shown}); "
                    f"{REMEDIES}"
                )
        for task, values in summary.items():
            if values["entropy"] < 0.05 * math.log(max(len(values["usage"]), 2)):
                messages.append(
                    f"task {task}: its gate almost always picks one expert (entropy {values['entropy']:.3f}); {REMEDIES}"
                )
        return messages


def leak_warnings(metrics: Dict[str, Dict[str, float]]) -> List[str]:
    """A binary task scored above LEAK_AUC: a label column is probably among the features (unless the AUC is over
    too few rows of a class to mean anything, which the table marks instead)."""
    return [
        f"task {task}: AUC {values['auc']:.4f} > {LEAK_AUC}: is its label (or a copy of it) among the features?"
        for task, values in metrics.items()
        if values.get("auc", 0.0) > LEAK_AUC and not unreliable(values)
    ]


def label_copy_warnings(
    dense: np.ndarray,
    sparse: np.ndarray,
    labels: Dict[str, np.ndarray],
    dense_names: List[str],
    sparse_names: List[str],
    max_rows: int = 200_000,
) -> List[str]:
    """Features that give a label away, checked on the first ``max_rows`` training rows before training:

    - a dense feature whose correlation with a label is above 0.999 in absolute value (a copy, or a monotone copy);
    - a categorical feature whose every repeated value (two or more rows; such rows at least half of all) holds one
      label value only, over rows with that label present (a label encoded as a category), when the label varies.
    """
    rows = slice(0, min(max_rows, len(dense)))
    messages = []
    for label, values in labels.items():
        y = np.asarray(values[rows], dtype=np.float64)
        present = ~np.isnan(y)
        if present.sum() < 2 or np.ptp(y[present]) == 0:
            continue
        y = y[present]
        for i, name in enumerate(dense_names):
            x = np.asarray(dense[rows, i], dtype=np.float64)[present]
            if np.ptp(x) > 0 and abs(np.corrcoef(x, y)[0, 1]) > 0.999:
                messages.append(f"feature {name} copies label {label} (correlation {np.corrcoef(x, y)[0, 1]:+.4f})")
        for i, name in enumerate(sparse_names):
            ids = np.asarray(sparse[rows, i])[present]
            distinct, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
            repeated = counts[inverse] >= 2  # a value seen once is trivially pure: a unique ID proves nothing
            if (counts >= 2).sum() < 2 or repeated.mean() < 0.5:
                continue
            low, high = np.full(len(distinct), np.inf), np.full(len(distinct), -np.inf)
            np.minimum.at(low, inverse[repeated], y[repeated])
            np.maximum.at(high, inverse[repeated], y[repeated])
            if np.all(low[counts >= 2] == high[counts >= 2]):
                messages.append(f"feature {name} gives label {label} away: each of its values has one label value")
    return messages


class TaskGradientCosine:
    """Mean cosine similarity between loss terms' gradients on the shared tower parameters, sampled during training.

    One training step in every ``every`` is measured: each term's gradient on the shared parameters is taken (one
    extra backward pass per term through the tower; the embedding tables' gradients are fused away and not seen) and
    the pairwise cosines are averaged over the sampled steps. Near 1: the tasks pull the shared parameters the same
    way; below 0: they conflict.

    A sample costs one to three training steps' time (four terms, an MMoE of 4 experts [256, 128], batches of 2048 to
    512 rows: more at the smaller), so it is sampled rather than paid every step: at ``every`` = 500
    (``objective.gradient_cosine_every``'s default) about 0.3-0.6% of training time (tools/bench_diagnostics.py
    measures the default diagnostics together). The sampled steps sit in the middle
    of each span of ``every`` steps (step ``(every + 1) // 2``, then every ``every``), so the first is not the
    untrained model; a run told its length (``plan_steps``, which ``train`` calls) shorter than that is sampled in its
    middle instead, so every run of at least one step carries a sample. Steps are counted from the run's start: after a
    resume, the steps before it count (their cosines are not kept, only this process's samples are).

    Example::

        >>> monitor = TaskGradientCosine(every=1)
        >>> shared = nn.Parameter(torch.ones(3)); monitor.attach([shared])
        >>> monitor.observe({"a": shared.sum(), "b": -shared.sum()})
        >>> monitor.summary(), monitor.sampled_steps
        ({'a|b': -1.0}, [1])
    """

    def __init__(self, every: int = 500) -> None:
        if every < 1:
            raise ValueError(f"every: {every}; allowed: >= 1")
        self.every = every
        self.first = (every + 1) // 2  # the middle of the first span (1 for every <= 2)
        self.shared: List[nn.Parameter] = []
        self.calls = 0  # training steps seen (a training forward is one step), those before a resume included
        self.sampled_steps: List[int] = []
        self.sums: Dict[str, float] = {}
        self.squares: Dict[str, float] = {}  # for the spread of a pair's samples (``warnings``)

    @property
    def samples(self) -> int:
        return len(self.sampled_steps)

    def attach(self, shared_parameters: List[nn.Parameter]) -> None:
        self.shared = [p for p in shared_parameters if p.requires_grad]

    def plan_steps(self, total_steps: int, steps_done: int = 0) -> None:
        """The run will train ``total_steps`` steps (at most: early stopping may end it sooner), ``steps_done`` of
        them already (a resumed run): a run shorter than ``every`` is sampled in its middle."""
        self.calls = steps_done
        self.first = max(1, min((self.every + 1) // 2, (total_steps + 1) // 2))

    def is_sampled(self, step: int) -> bool:
        """Whether training step ``step`` (1-based) is one whose gradient cosine is measured."""
        return step >= self.first and (step - self.first) % self.every == 0

    def observe(self, terms: Dict[str, torch.Tensor]) -> None:
        self.calls += 1
        if not self.shared or len(terms) < 2 or not self.is_sampled(self.calls) or not torch.is_grad_enabled():
            return
        flat = {name: flat_gradient(loss, self.shared) for name, loss in terms.items() if loss.requires_grad}
        names = list(flat)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                cosine = torch.nn.functional.cosine_similarity(flat[first], flat[second], dim=0, eps=1e-12)
                key = f"{first}|{second}"
                self.sums[key] = self.sums.get(key, 0.0) + float(cosine)
                self.squares[key] = self.squares.get(key, 0.0) + float(cosine) ** 2
        self.sampled_steps.append(self.calls)

    def summary(self) -> Dict[str, float]:
        return {pair: round(total / max(self.samples, 1), 6) for pair, total in self.sums.items()}

    def standard_error(self, pair: str) -> float:
        """The standard error of ``pair``'s mean cosine over the sampled steps (inf with fewer than two)."""
        n = self.samples
        if n < 2:
            return math.inf
        mean = self.sums[pair] / n
        variance = max(self.squares[pair] / n - mean * mean, 0.0) * n / (n - 1)
        return math.sqrt(variance / n)

    def warnings(self, below: float = -0.1) -> List[str]:
        """A pair whose mean cosine is below ``below`` and below 0 by more than twice its standard error: one batch's
        cosine swings by about 0.3, so a mean of a few samples (one step in 500 is sampled) below -0.1 is often
        noise."""
        return [
            f"tasks {pair.replace('|', ' and ')} conflict on the shared tower parameters (mean gradient cosine "
            f"{value:.3f} over {self.samples} sampled steps)"
            for pair, value in self.summary().items()
            if value < below and value + 2 * self.standard_error(pair) < 0
        ]
