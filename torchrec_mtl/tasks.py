"""Tasks declared as data, and the objective they make: losses, per-task predictions and evaluation labels.

A **task** is one tower output: a label column, a kind (torchrec_mtl.task_kinds: ``binary``: BCE on a logit;
``regression``: squared error on an output plus an offset, the label's training mean), a loss weight and a **sample
space**, the rows it is trained and evaluated on:

- ``present``: rows where its label is present (NaN marks a missing label);
- ``given: T``: rows where binary task T's label is 1 (and this label present), e.g. CVR on clicked rows. With
  ``ips`` its loss on those rows is weighted by 1 / p_T (detached, clipped below at ``min_propensity``,
  self-normalised): ESCM2's counterfactual regulariser (Wang et al., SIGIR 2022), which estimates the loss over the
  entire impression space instead of the clicked rows alone.

**Relations** tie tasks together and work with any tower:

- a **product** (ESMM, Ma et al., SIGIR 2018): p = p_A x p_B, trained with BCE on every row where its label is
  determined: 1 when all component labels are 1, 0 when any is 0 (so ``ctcvr`` = click and conversion, 0 on every
  unclicked row). It is evaluated like a task.
- an **order** constraint p_lower <= p_upper (e.g. p(conversion) <= p(click) for two independent heads), a hinge
  penalty mean(relu(p_lower - p_upper)) over all rows; names may be tasks or products.

A **retrieval** task (at most one) is not a tower output: the model's two-tower arch (torchrec_mtl.modules.two_tower)
gives each row a user vector and an item vector, and the task trains them on the rows where its binary label is 1
with a softmax over the items of those rows in the batch (in-batch negatives, corrected for sampling by popularity).
It is evaluated on every row by the AUC of the user-item score (``u . v``) against its label.

The one missing-label convention (NaN, and ``row_weight`` 0 for padding) drives the losses and the evaluation labels
(NaN outside a space), so losses and metrics agree on which rows belong to a task.

The default, ``esmm_tasks()``:

==========  ============  ==========================  ==================  ======
name        prediction    label                       rows                weight
==========  ============  ==========================  ==================  ======
ctr         pCTR          click                       all                 1
cvr         pCVR          conversion                  clicked, IPS        0.3
rating      output + mean rating                      rows with a rating  0.3
ctcvr       pCTR x pCVR   click and conversion        all                 1
==========  ============  ==========================  ==================  ======
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.modules.two_tower import ITEM_VECTOR, USER_VECTOR, InBatchSoftmax
from torchrec_mtl.task_kinds import KINDS
from torchrec_mtl.train.diagnostics import TaskGradientCosine
from torchrec_mtl.weighting import make_weighting



@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    label: str
    weight: float = 1.0
    given: Optional[str] = None  # the sample space: rows where this binary task's label is 1
    ips: bool = False  # weight the loss by 1 / p(given)


@dataclass(frozen=True)
class ProductSpec:
    name: str
    of: Tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class OrderSpec:
    lower: str
    upper: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"order_{self.lower}_le_{self.upper}"


@dataclass(frozen=True)
class TaskSet:
    """Tasks and relations, checked against each other (not yet against a dataset's labels)."""

    tasks: Tuple[TaskSpec, ...]
    products: Tuple[ProductSpec, ...] = ()
    orders: Tuple[OrderSpec, ...] = ()

    def __post_init__(self) -> None:
        kinds: Dict[str, str] = {}
        for task in self.tasks:
            if task.kind not in KINDS:
                raise ValueError(f"tasks.{task.name}.kind: {task.kind!r}; allowed: {', '.join(sorted(KINDS))}")
            kinds[task.name] = task.kind
        if sum(task.kind == "retrieval" for task in self.tasks) > 1:
            raise ValueError("tasks: at most one task of kind retrieval (the model has one two-tower arch)")
        for task in self.tasks:
            if task.kind == "retrieval" and (task.given is not None or task.ips):
                raise ValueError(f"tasks.{task.name}: a retrieval task trains on its positive rows; no given or ips")
            if task.given is not None and kinds.get(task.given) != "binary":
                raise ValueError(f"tasks.{task.name}.given: {task.given!r} is not a binary task")
            if task.ips and task.given is None:
                raise ValueError(f"tasks.{task.name}.ips: needs a given task (the propensity)")
        for product in self.products:
            if product.name in kinds:
                raise ValueError(f"products.{product.name}: the name is already a task")
            bad = [name for name in product.of if kinds.get(name) != "binary"]
            if len(product.of) < 2 or bad:
                raise ValueError(f"products.{product.name}.of: needs two or more binary tasks; not binary tasks: {bad}")
            kinds[product.name] = "binary"
        for i, order in enumerate(self.orders):
            for side in ("lower", "upper"):
                if kinds.get(getattr(order, side)) != "binary":
                    raise ValueError(f"orders[{i}].{side}: {getattr(order, side)!r} is not a binary task or product")

    @property
    def names(self) -> Dict[str, str]:
        """Every evaluated name (tasks, then products) -> its kind."""
        return {**{t.name: t.kind for t in self.tasks}, **{p.name: "binary" for p in self.products}}

    @property
    def tower_tasks(self) -> List[str]:
        """The tasks with a tower head (all but retrieval)."""
        return [task.name for task in self.tasks if KINDS[task.kind].tower_head]

    @property
    def retrieval(self) -> Optional[TaskSpec]:
        """The retrieval task, if one is declared."""
        return next((task for task in self.tasks if task.kind == "retrieval"), None)

    @property
    def labels(self) -> List[str]:
        return list(dict.fromkeys(task.label for task in self.tasks))

    @property
    def weights(self) -> Dict[str, float]:
        terms = {t.name: t.weight for t in self.tasks}
        terms.update({p.name: p.weight for p in self.products})
        terms.update({o.name: o.weight for o in self.orders})
        return terms


def esmm_tasks(ctr: float = 1.0, ctcvr: float = 1.0, cvr_ips: float = 0.3, rating: float = 0.3) -> TaskSet:
    """CTR on all rows, CVR on clicked rows (IPS-weighted), CTCVR = CTR x CVR on all rows, rating on rated rows."""
    return TaskSet(
        tasks=(
            TaskSpec("ctr", "binary", "click", ctr),
            TaskSpec("cvr", "binary", "conversion", cvr_ips, given="ctr", ips=True),
            TaskSpec("rating", "regression", "rating", rating),
        ),
        products=(ProductSpec("ctcvr", ("ctr", "cvr"), ctcvr),),
    )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` weighted by ``mask`` (bool or float weights); 0 when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p < 0, stable near 0."""
    log_p = log_p.clamp(max=-1e-7)
    return torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def _bce_from_log_p(log_p: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return -(label * log_p + (1 - label) * _log1mexp(log_p))


class MultiTaskObjective(nn.Module):
    """Loss, predictions and evaluation labels for a ``TaskSet`` from the tower's per-task outputs.

    Args:
        task_set: the declared tasks and relations.
        offsets: regression task -> value added to its output (its label's training mean), so it starts there.
        weighting: how the weighted terms add up (torchrec_mtl.weighting): ``static`` or ``uncertainty``.
        min_propensity: p(given) is clipped below at this in IPS weights.
        gradient_cosine_every: on one training step in every N (the middle of each span), record the pairwise
            cosines of the terms' gradients on the shared tower parameters (0: never; ``TaskGradientCosine``).
        retrieval_loss: the retrieval task's loss (needed when the task set has one), and ``item_feature``, the
            KJT key of the item ID whose rows it reads (for the popularity correction and same-item masking).

    ``forward`` returns ``(loss, (loss.detach(), predictions, labels))``: predictions and labels per evaluated name
    (tasks and products), labels NaN outside each one's sample space. ``last_terms`` keeps the last forward's loss
    terms (detached) for the progress bar and for naming a non-finite one.
    """

    def __init__(
        self,
        task_set: TaskSet,
        offsets: Optional[Dict[str, float]] = None,
        weighting: str = "static",
        min_propensity: float = 0.01,
        gradient_cosine_every: int = 0,
        retrieval_loss: Optional[InBatchSoftmax] = None,
        item_feature: Optional[str] = None,
    ) -> None:
        super().__init__()
        if task_set.retrieval is not None and (retrieval_loss is None or item_feature is None):
            raise ValueError(
                f"task {task_set.retrieval.name!r} is a retrieval task: give retrieval_loss and item_feature"
            )
        self.task_set = task_set
        self.retrieval_loss = retrieval_loss
        self.item_feature = item_feature
        # sampled on one training step in every N on the shared tower parameters (0: off); see train/diagnostics.py
        self.gradient_cosine = TaskGradientCosine(gradient_cosine_every) if gradient_cosine_every > 0 else None
        self.offsets = dict(offsets or {})
        self.min_propensity = min_propensity
        self.weighting = make_weighting(weighting, task_set.weights)
        self.last_terms: Dict[str, torch.Tensor] = {}
        # fp16 training (torchrec_mtl.precision): the loss backpropagated is scaled, the one reported is not
        self.loss_scaler: Optional[torch.amp.GradScaler] = None

    def forward(
        self, logits: Dict[str, torch.Tensor], batch: MultiTaskBatch
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
        terms, predictions, eval_labels = self._terms(logits, batch)
        if self.gradient_cosine is not None and self.training:
            self.gradient_cosine.observe(terms)
        # kept so that a non-finite loss can be traced to its term (torchrec_mtl.train.loop.NonFiniteLoss)
        self.last_terms = {name: term.detach() for name, term in terms.items()}
        loss = self.weighting(terms)
        backward = self.loss_scaler.scale(loss) if self.loss_scaler is not None and self.training else loss
        return backward, (loss.detach(), predictions, eval_labels)

    def plan_steps(self, total_steps: int, steps_done: int = 0) -> None:
        """The training run's length (at most ``total_steps``; ``steps_done`` before a resume), for the gradient
        cosine's sampled steps (``TaskGradientCosine.plan_steps``)."""
        if self.gradient_cosine is not None:
            self.gradient_cosine.plan_steps(total_steps, steps_done)

    def loss(self, logits: Dict[str, torch.Tensor], batch: MultiTaskBatch) -> torch.Tensor:
        """The weighted loss alone, with no side effect: no gradient-cosine sample, ``last_terms`` kept, and the
        weighting's current multipliers used as they are (GradNorm moves them once a step, in ``forward``). For a
        second pass in the same step (adversarial training, torchrec_mtl.modules.adversarial)."""
        terms, _, _ = self._terms(logits, batch)
        was_training = self.weighting.training
        self.weighting.train(False)  # GradNorm updates only in training mode
        try:
            return self.weighting(terms)
        finally:
            self.weighting.train(was_training)

    def _terms(
        self, logits: Dict[str, torch.Tensor], batch: MultiTaskBatch
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Each weighted term's loss, and the predictions and evaluation labels of every evaluated name."""
        nan = torch.full_like(batch.row_weight, float("nan"))
        weights = self.task_set.weights
        log_p: Dict[str, torch.Tensor] = {}
        label: Dict[str, torch.Tensor] = {}  # 0/1 or value; NaN where undetermined or padding
        for task in self.task_set.tasks:
            raw = torch.where(batch.row_weight > 0, batch.labels[task.label], nan)
            label[task.name] = raw
            if task.kind == "binary":
                log_p[task.name] = F.logsigmoid(logits[task.name])

        terms: Dict[str, torch.Tensor] = {}
        predictions: Dict[str, torch.Tensor] = {}
        eval_labels: Dict[str, torch.Tensor] = {}
        for task in self.task_set.tasks:
            if task.kind == "retrieval":
                term, predictions[task.name], eval_labels[task.name] = self._retrieval(logits, batch, label[task.name])
                if weights[task.name]:
                    terms[task.name] = term
                continue
            present = ~torch.isnan(label[task.name])
            space = present if task.given is None else present & (torch.nan_to_num(label[task.given]) == 1)
            target = torch.nan_to_num(label[task.name])
            kind = KINDS[task.kind]
            output = logits[task.name]
            if task.name in self.offsets:  # a regression task starts at its label's training mean
                output = output + self.offsets[task.name]
            loss = kind.loss(output, target)
            predictions[task.name] = kind.prediction(output.detach())
            row_weights = space.float()
            if task.ips:
                propensity = log_p[task.given].detach().exp().clamp(min=self.min_propensity)
                row_weights = row_weights / propensity
            if weights[task.name]:
                terms[task.name] = masked_mean(loss, row_weights)
            eval_labels[task.name] = torch.where(space, target, nan)

        for product in self.task_set.products:
            parts = [label[name] for name in product.of]
            any_zero = torch.stack([part == 0 for part in parts]).any(dim=0)
            all_one = torch.stack([part == 1 for part in parts]).all(dim=0)
            determined = any_zero | all_one
            target = all_one.float()
            product_log_p = sum(log_p[name] for name in product.of)
            if weights[product.name]:
                terms[product.name] = masked_mean(_bce_from_log_p(product_log_p, target), determined)
            predictions[product.name] = product_log_p.detach().exp()
            eval_labels[product.name] = torch.where(determined, target, nan)
            log_p[product.name] = product_log_p

        real = (batch.row_weight > 0).float()
        for order in self.task_set.orders:
            if weights[order.name]:
                gap = torch.relu(log_p[order.lower].exp() - log_p[order.upper].exp())
                terms[order.name] = masked_mean(gap, real)

        return terms, predictions, eval_labels

    def _retrieval(
        self, outputs: Dict[str, torch.Tensor], batch: MultiTaskBatch, label: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss over the positive rows, each row's score u . v, its evaluation label) of the retrieval task."""
        user, item = outputs[USER_VECTOR], outputs[ITEM_VECTOR]
        positive = torch.nan_to_num(label) == 1  # NaN: missing or padding
        item_rows = batch.sparse_features[self.item_feature].values()  # one ID per row
        loss = self.retrieval_loss(user[positive], item[positive], item_rows[positive])
        return loss, (user * item).sum(dim=1).detach(), label


# The tower heads of the default task set: ``build_model``'s default when no task set is given.
TOWER_TASKS = esmm_tasks().tower_tasks
