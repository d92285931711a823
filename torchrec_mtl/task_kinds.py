"""What a kind of task means, in one place: the label it reads, its per-row loss, its prediction, the metrics it is
evaluated by and the one it is judged by.

``KINDS`` is the one registry: ``objective.tasks.<name>.kind`` names a key. The objective (torchrec_mtl.tasks) calls
a kind's ``loss`` and ``prediction``, the metrics (torchrec_mtl.train.metrics) ask for its ``metrics``, and tables,
curve lines and the report show its ``headline`` metric. A new kind is a subclass plus ``register_kind`` (see
docs/architecture.md). torch is imported inside the methods, so the report reads the kinds without it.

Example::

    >>> KINDS["binary"].headline, KINDS["regression"].headline, KINDS["binary"].higher_is_better
    ('auc', 'rmse', True)
    >>> sorted(KINDS)
    ['binary', 'regression', 'retrieval']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple

if TYPE_CHECKING:
    import torch


class TaskKind:
    """A kind of task. Subclasses set the class attributes and, for a tower head, ``loss`` and ``prediction``.

    Attributes:
        name: the config's name of the kind.
        label_kind: the kind of label column it reads (a schema's ``labels``: ``binary`` or ``regression``).
        metrics: torchrec ``RecMetricEnum`` member names (``AUC``, ``NE``, ``CALIBRATION``, ``MSE``, ``MAE``), each
            reported under its lower-case name (with ``rmse`` beside ``mse``).
        headline: the metric the task is judged by; ``higher_is_better`` says which way.
        tower_head: whether the task is one logit of the tower (a retrieval task is the two-tower arch instead).
    """

    name: str = ""
    label_kind: str = "binary"
    metrics: Tuple[str, ...] = ()
    headline: str = ""
    higher_is_better: bool = True
    tower_head: bool = True

    def loss(self, output: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        """The per-row loss of the tower's ``output`` (plus the task's offset) against ``target`` (0 where the
        label is missing: those rows get weight 0)."""
        raise NotImplementedError(f"task kind {self.name!r} has no per-row loss")

    def prediction(self, output: "torch.Tensor") -> "torch.Tensor":
        """What the task predicts from the tower's ``output`` (plus its offset): a probability, a value."""
        raise NotImplementedError(f"task kind {self.name!r} has no prediction from a tower output")


class Binary(TaskKind):
    """A 0/1 label, BCE on a logit, predicted as a probability."""

    name, label_kind, headline = "binary", "binary", "auc"
    metrics = ("AUC", "NE", "CALIBRATION")

    def loss(self, output: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(output, target, reduction="none")

    def prediction(self, output: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        return F.logsigmoid(output).exp()  # as exp(log p), the form the products multiply


class Regression(TaskKind):
    """A real label, squared error on the output plus an offset (the label's training mean), predicted as that."""

    name, label_kind, headline, higher_is_better = "regression", "regression", "rmse", False
    metrics = ("MSE", "MAE")

    def loss(self, output: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        return (output - target) ** 2

    def prediction(self, output: "torch.Tensor") -> "torch.Tensor":
        return output


class Retrieval(TaskKind):
    """A 0/1 label whose positive rows train the two-tower arch (an in-batch softmax, torchrec_mtl.tasks); scored by
    the user-item cosine, which is no probability: AUC alone."""

    name, label_kind, headline = "retrieval", "binary", "auc"
    metrics = ("AUC",)
    tower_head = False


KINDS: Dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add ``kind`` to ``KINDS`` under ``kind.name`` (refusing a name already taken); returns it."""
    if not kind.name or kind.name in KINDS:
        raise ValueError(f"task kind {kind.name!r}: needs a name not yet in {sorted(KINDS)}")
    KINDS[kind.name] = kind
    return kind


for _kind in (Binary(), Regression(), Retrieval()):
    register_kind(_kind)
