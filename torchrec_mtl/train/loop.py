"""Training and evaluation through TorchRec's TrainPipelineSparseDist.

Training runs forward, backward and the optimizer step, overlapping the next batch's input distribution; evaluation
runs torchrec's EvalPipelineSparseDist (forward only) over the same sharded model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist, TrainPipelineSparseDist
from tqdm import tqdm

from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.device import collective_device
from torchrec_mtl.errors import NonFiniteLoss  # noqa: F401 (raised here; importable from here, as before)
from torchrec_mtl.headline import headline, task_kind
from torchrec_mtl.results import unreliable
from torchrec_mtl.train.diagnostics import GateMonitor
from torchrec_mtl.train.metrics import TaskMetrics, grouped_auc
from torchrec_mtl.precision import ScaledStep
from torchrec_mtl.train.optimizers import LearningRateSchedule
from torchrec_mtl.protocols import PlansSteps, ReportsTerms, find
from torchrec_mtl.progress import bar_disabled


@dataclass
class TrainSummary:
    """What a training run did, and (``epoch``, ``batch``, the running sums) where it is: a checkpoint stores it
    and a resumed run continues from it exactly."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    losses: List[float] = field(default_factory=list)  # mean loss of each finished epoch, this rank
    # every ``curve_every`` steps: the step, the mean loss since the last point, and each task's windowed metrics
    curve: List[Dict] = field(default_factory=list)
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # its batches done
    epoch_loss: float = 0.0  # the sum of its batches' losses
    since_loss: float = 0.0  # the sum of the losses since the last curve point
    since_steps: int = 0
    stopped: bool = False  # ``after_step`` asked to stop before the last epoch ended
    # at each validation point, with model selection (``validate``): the epoch, step, score and metrics on validation
    validation: List[Dict] = field(default_factory=list)
    converged: bool = False  # ``validate`` stopped training before ``epochs`` (early stopping)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict) -> "TrainSummary":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


class CurveWindow:
    """The batches behind the next curve point: their predictions and labels, kept (not yet reduced) so that a
    checkpoint can carry them and the point computed after a resume is the one an uninterrupted run computes. They
    are kept on the host (a checkpoint's rank state must load anywhere, and 100 batches need not hold GPU memory);
    the metrics run on ``device``, the run's."""

    def __init__(
        self, task_kinds: Dict[str, str], batch_size: int, window_batches: int, world_size: int, device: torch.device
    ) -> None:
        self.task_kinds, self.batch_size, self.device = task_kinds, batch_size, device
        self.window_size = window_batches * batch_size * world_size
        self.batches: List[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = []
        self._metrics: Optional[TaskMetrics] = None

    def add(self, predictions: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor]) -> None:
        detach = lambda values: {k: v.detach().cpu().clone() for k, v in values.items()}  # noqa: E731
        self.batches.append((detach(predictions), detach(labels)))

    def compute(self) -> Dict[str, Dict[str, float]]:
        """Each task's metrics over the kept batches of every rank (a collective); then the window is emptied."""
        if self._metrics is None:  # built once: a RecMetricModule takes about a second to build
            self._metrics = TaskMetrics(
                self.task_kinds, self.batch_size, self.window_size, self.device, count_rows=True
            )
        self._metrics.reset()
        if self.batches:
            # one update of the window's rows, not one per batch: torchrec's metrics take about a millisecond a call
            # whatever its rows, and 100 calls a point were ~1% of training time at the defaults (the values are the
            # same but for the order of float64 sums)
            self._metrics.update(*(self._concatenated(part) for part in (0, 1)))
        self.batches = []
        return self._metrics.compute()

    def _concatenated(self, part: int) -> Dict[str, torch.Tensor]:
        """Each task's predictions (``part`` 0) or labels (1) of the kept batches, in their order, as one tensor."""
        return {name: torch.cat([batch[part][name] for batch in self.batches]) for name in self.task_kinds}


def _objective(model: nn.Module) -> Optional[nn.Module]:
    """The module whose ``last_terms`` hold the last step's loss terms (torchrec_mtl.tasks.MultiTaskObjective)."""
    return find(model, ReportsTerms)


def _rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def agree_max(values: Sequence[int]) -> List[int]:
    """Each of ``values``' maximum over all ranks: one all-reduce of a few integers (every rank must call it, with as
    many values); in one process, the values themselves and no collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [int(value) for value in values]
    flags = torch.tensor([int(value) for value in values], dtype=torch.int64, device=collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def _non_finite_loss(
    objective: Optional[nn.Module], loss: float, step: int, epoch: int, rank: int = 0, world_size: int = 1
) -> NonFiniteLoss:
    terms = objective.last_terms if objective is not None else {}
    bad = {name: float(value) for name, value in terms.items() if not torch.isfinite(value).all()}
    named = ", ".join(f"{name} ({value})" for name, value in bad.items()) or "none of the task terms (the weighting)"
    where, everywhere = (f" on rank {rank} of {world_size}", " on every rank") if world_size > 1 else ("", "")
    return NonFiniteLoss(
        f"step {step} (epoch {epoch + 1}): the loss is {loss}{where}; not finite: {named}. Training stopped"
        f"{everywhere} before any checkpoint of this state was written; lower the learning rates or set "
        "training.gradient_clip_norm"
    )


def _agreed_non_finite(
    objective: Optional[nn.Module], loss: float, step: int, epoch: int, seen_by: int
) -> NonFiniteLoss:
    """The error every rank raises when rank ``seen_by`` (the lowest whose loss was not finite) saw one: that rank
    words it and sends the words to the others (a collective: every rank calls it, after agreeing on ``seen_by``)."""
    rank, world_size = _rank_and_world()
    message = [str(_non_finite_loss(objective, loss, step, epoch, rank, world_size)) if rank == seen_by else None]
    if world_size > 1:
        dist.broadcast_object_list(message, src=seen_by)
        # the pipeline has already started the next batch's input exchange on every rank: a barrier waits for it
        # (gloo completes earlier work first), so no collective is left running when the ranks stop
        dist.barrier()
    return NonFiniteLoss(message[0])


def make_pipeline(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> TrainPipelineSparseDist:
    """The training pipeline on ``device``; with fp16's ``scaler`` (torchrec_mtl.precision) its optimizer step
    unscales the dense gradients and skips a step whose gradients are not finite."""
    stepped = ScaledStep(optimizer, scaler) if scaler is not None else optimizer
    return TrainPipelineSparseDist(model, stepped, device, execute_all_batches=True)


def pipeline_device(pipeline: TrainPipelineSparseDist) -> torch.device:
    """The device ``pipeline`` moves every batch to and runs the model on (the one it was made with)."""
    return pipeline._device


def make_eval_pipeline(model: nn.Module, device: torch.device) -> EvalPipelineSparseDist:
    """Forward-only pipelining for evaluation (the next batch's input distribution overlaps this one's forward)."""
    return EvalPipelineSparseDist(model, optimizer=None, device=device)


def _validated(validate: Callable[[TrainSummary], bool], summary: TrainSummary) -> float:
    """Run ``validate`` at a point (it sets ``summary.converged``) and return the seconds it took: training time and
    samples/s leave the validation out."""
    began = time.perf_counter()
    summary.converged = validate(summary)
    return time.perf_counter() - began


def _segments(batches: Iterator, count: int, steps_done: int, every: int) -> Iterator[Iterable]:
    """``count`` of ``batches`` as consecutive segments, each ending where the step count (``steps_done`` before the
    first) reaches a multiple of ``every`` or the batches end (every: 0 for one segment). One iterator is shared, so a
    segment's end drains the pipeline without skipping or replaying a batch."""
    while count > 0:
        size = min(count, every - steps_done % every) if every else count
        yield itertools.islice(batches, size)
        count, steps_done = count - size, steps_done + size


def _drain(pipeline: TrainPipelineSparseDist, batches: Iterable, bar: tqdm):
    """Yield ``(loss, predictions, labels)`` for each of ``batches``, advancing ``bar``; the pipeline is reset for
    the next pass when they run out or the caller stops early."""
    iterator = iter(batches)
    try:
        while True:
            try:
                output = pipeline.progress(iterator)
            except StopIteration:
                break
            bar.update(1)
            yield output
    finally:
        pipeline.reset()


def _bar(total: int, description: str, show_progress: bool) -> tqdm:
    return tqdm(total=total, desc=description, disable=bar_disabled(show_progress), unit="batch", leave=False)


COUNT_LABELS = (("rows", "rows"), ("positives", "pos."))


def curve_line(point: Dict, total_steps: int) -> str:
    """One curve point as a line, each metric with the rows (and positives) of the window it was computed on:
    ``step 400/2343 (epoch 1): loss 0.4812, ctr auc 0.7221 (102,400 rows, 6,131 pos.), rating rmse 0.6012 ...``."""
    metrics = []
    for task, values in point.items():
        if not isinstance(values, dict) or task_kind(values) is None:  # tasks, not the gates
            continue
        counts = [f"{int(values[key]):,} {label}" for key, label in COUNT_LABELS if key in values]
        mark = "; unreliable" if unreliable(values) else ""
        counts_text = f" ({', '.join(counts)}{mark})" if counts else ""
        metrics.append(f"{task} {headline(values)} {values[headline(values)]:.4f}{counts_text}")
    return f"step {point['step']}/{total_steps} (epoch {point['epoch']}): loss {point['loss']:.4f}, " + ", ".join(metrics)


class _RunningTerms:
    """Each loss term's exponential moving average over recent steps, for the progress bar."""

    def __init__(self, objective: Optional[nn.Module], decay: float = 0.95) -> None:
        self.objective, self.decay, self.values = objective, decay, {}

    def update(self) -> None:
        for name, value in getattr(self.objective, "last_terms", {}).items():
            value = float(value)
            self.values[name] = value if name not in self.values else self.decay * self.values[name] + (1 - self.decay) * value

    def postfix(self, summary: TrainSummary) -> Dict[str, str]:
        rate = summary.samples / summary.seconds if summary.seconds else 0.0
        return {"samples/s": f"{rate:,.0f}", **{name: f"{value:.4f}" for name, value in self.values.items()}}


# Called after each training step with the summary so far and the curve window; True asks to stop. A hook that must
# agree with the other ranks each step (torchrec_mtl.train.resume.CheckpointTrigger) may ride on the loop's own per-step
# all-reduce: it has ``local_flags()`` (this rank's few integers, called right after the step) and is then called as
# ``after_step(summary, window, agreed)`` with their maximum over the ranks.
AfterStep = Callable[[TrainSummary, Optional[CurveWindow]], bool]


def train(
    model: nn.Module,
    pipeline: TrainPipelineSparseDist,
    loader: BatchLoader,
    epochs: int,
    show_progress: bool = True,
    task_kinds: Optional[Dict[str, str]] = None,
    curve_every: int = 0,
    window_batches: int = 100,
    gated_tower: Optional[nn.Module] = None,
    resume: Optional[Tuple[TrainSummary, Optional[List]]] = None,
    after_step: Optional[AfterStep] = None,
    schedule: Optional[LearningRateSchedule] = None,
    on_curve_point: Optional[Callable[[Dict], None]] = None,
    validate: Optional[Callable[[TrainSummary], bool]] = None,
    validate_every: int = 0,
    device: Optional[torch.device] = None,
) -> TrainSummary:
    """Run ``epochs`` passes over ``loader`` with ``pipeline`` (built over ``model``); every rank's loader must
    have the same length. With ``task_kinds`` and ``curve_every`` > 0, each task's metrics over the last
    ``window_batches`` batches (all ranks) are recorded every ``curve_every`` steps (every rank computes them at
    the same steps, as the reduction needs); with ``gated_tower`` (MMoE, PLE) each point also holds its gates'
    entropy and expert usage per task over those batches (this rank's rows, ``GateMonitor``; after a resume, over
    the window's batches since the resume).

    The model's part that samples steps (``PlansSteps``: the objective's gradient cosine) is told the run's length,
    ``epochs`` passes, first.

    ``resume`` (a checkpoint's summary and curve window batches, ``restore_run``) continues a run where it stopped;
    ``after_step`` is called after every step (to write checkpoints) and may stop the run early (``summary.stopped``);
    ``validate`` after every finished epoch and, with ``validate_every`` > 0, after every ``validate_every``-th step
    inside an epoch; the pipeline is drained first (to score the model on validation rows, a point's batches all
    trained), and it may end training there (``summary.converged``).

    A non-finite loss on any rank stops every rank at that step with the same NonFiniteLoss (naming the lowest rank
    that saw one): the ranks agree after each step through one all-reduce of a few integers, which also carries
    ``after_step``'s flags when it has ``local_flags`` (AfterStep); in one process there is no collective.

    The curve's metrics run on ``device`` (default: the pipeline's, where the predictions arrive).
    """
    summary, window_batches_kept = resume if resume is not None else (TrainSummary(), None)
    window = None
    if task_kinds and curve_every > 0:
        device = device if device is not None else pipeline_device(pipeline)
        window = CurveWindow(task_kinds, loader.batch_size, window_batches, loader.world_size, device)
        window.batches = list(window_batches_kept or [])
    monitor: Optional[GateMonitor] = None
    objective = _objective(model)
    running = _RunningTerms(objective)
    if schedule is not None:
        schedule.set_step(summary.steps)
    sampler = find(model, PlansSteps)  # the gradient cosine's sampled steps depend on the run's length
    if sampler is not None:
        sampler.plan_steps(epochs * len(loader), summary.steps)
    rank, world_size = _rank_and_world()
    hook_flags: Optional[Callable[[], Sequence[int]]] = getattr(after_step, "local_flags", None)
    model.train()
    start = time.perf_counter() - summary.seconds
    for epoch in range(summary.epoch, epochs):
        if epoch != summary.epoch:
            summary.epoch, summary.batch, summary.epoch_loss = epoch, 0, 0.0
        loader.set_epoch(epoch, start_batch=summary.batch)
        batches_left = len(loader) - summary.batch
        bar = _bar(batches_left, f"train epoch {epoch + 1}/{epochs}", show_progress)
        for batches in _segments(iter(loader), batches_left, summary.steps, validate_every if validate else 0):
            for loss, predictions, labels in _drain(pipeline, batches, bar):
                loss = float(loss.detach())
                # every rank learns of a non-finite loss on any rank (world_size - rank: the lowest such rank wins)
                agreed = agree_max([0 if math.isfinite(loss) else world_size - rank, *(hook_flags() if hook_flags else ())])
                if agreed[0]:
                    raise _agreed_non_finite(objective, loss, summary.steps + 1, epoch, world_size - agreed[0])
                summary.epoch_loss += loss
                summary.since_loss += loss
                summary.since_steps += 1
                summary.steps += 1
                summary.batch += 1
                summary.samples += loader.batch_size * loader.world_size
                lr_scale = schedule.set_step(summary.steps) if schedule is not None else 1.0
                # only the batches that the next point's window holds are kept (the metrics cost ~10% a step)
                if window is not None and -summary.steps % curve_every < window_batches:
                    window.add(predictions, labels)
                    if summary.steps % curve_every == 0:
                        point = {
                            "step": summary.steps,
                            "epoch": epoch + 1,
                            "loss": summary.since_loss / summary.since_steps,
                            "lr_scale": lr_scale,
                        }
                        if monitor is not None:
                            point["gates"] = monitor.summary()
                            monitor.__exit__()
                            monitor = None
                        summary.curve.append({**point, **window.compute()})
                        if on_curve_point is not None:
                            on_curve_point(summary.curve[-1])
                        summary.since_loss, summary.since_steps = 0.0, 0
                # watch the gates over the batches the next point's window holds
                if window is not None and gated_tower is not None and monitor is None:
                    if -(summary.steps + 1) % curve_every < window_batches:
                        monitor = GateMonitor(gated_tower).__enter__()
                summary.seconds = time.perf_counter() - start
                if show_progress:  # samples/s and each term's running loss beside the bar
                    running.update()
                    if summary.steps % 10 == 0:
                        bar.set_postfix(running.postfix(summary), refresh=False)
                if after_step is not None:
                    stop = after_step(summary, window, agreed[1:]) if hook_flags else after_step(summary, window)
                    if stop:
                        summary.stopped = True
                        break
            if summary.stopped or summary.batch == len(loader):
                break  # a stop ends the run; the epoch's end is validated below
            start += _validated(validate, summary)
            if summary.converged:
                break
        bar.close()
        if summary.stopped or summary.converged:
            break
        summary.losses.append(summary.epoch_loss / max(summary.batch, 1))
        summary.epoch, summary.batch, summary.epoch_loss = epoch + 1, 0, 0.0
        if validate is not None:
            start += _validated(validate, summary)
            if summary.converged:
                break
    if monitor is not None:
        monitor.__exit__()
    summary.seconds = time.perf_counter() - start
    return summary


@torch.no_grad()
def evaluate(
    model: nn.Module,
    pipeline: EvalPipelineSparseDist,
    loader: BatchLoader,
    task_kinds: Dict[str, str],
    show_progress: bool = True,
    groups: Optional[np.ndarray] = None,
    predictions_out: Optional[Dict[str, np.ndarray]] = None,
    device: Optional[torch.device] = None,
    rank_rows_out: Optional[Dict[str, Any]] = None,
) -> Dict[str, Dict[str, float]]:
    """Whole-set metrics per task over every row of ``loader`` (which should pad its tail), reduced over ranks.

    With ``groups`` (one integer per row of the loader's shards, e.g. the user; negative = unknown), binary tasks
    also get ``gauc``: the AUC within each group, averaged over groups (``grouped_auc``). A ``predictions_out`` dict
    receives this rank's rows: ``row`` (the index in the shards' order), and per task ``<task>.prediction`` and
    ``<task>.label`` (NaN outside the task's sample space); padding rows are left out. The metrics run on ``device``
    (default: the pipeline's, where the predictions arrive); the kept rows go to the host, where they are written.
    A ``rank_rows_out`` dict receives this rank's rows as the metrics saw them, padding included, in the loader's
    order: ``row`` (``loader.row_order()``) and every task's columns, from which ``metrics_of_rank_rows`` computes
    the same metrics (of other predictions of the same rows: an ensemble's, torchrec_mtl.ensemble).
    """
    device = device if device is not None else pipeline_device(pipeline)
    metrics = TaskMetrics(
        task_kinds, loader.batch_size, len(loader) * loader.batch_size * loader.world_size, device, count_rows=True
    )
    every_task = predictions_out is not None or rank_rows_out is not None
    keep = list(task_kinds) if every_task else [n for n, k in task_kinds.items() if k == "binary"]
    keep = keep if (groups is not None or every_task) else []
    kept: Dict[str, List[torch.Tensor]] = {f"{n}.{part}": [] for n in keep for part in ("prediction", "label")}
    model.eval()
    with _bar(len(loader), "evaluate", show_progress) as bar:
        for _, predictions, labels in _drain(pipeline, loader, bar):
            metrics.update(predictions, labels)
            for name in keep:
                kept[f"{name}.prediction"].append(predictions[name].detach().float().cpu())
                kept[f"{name}.label"].append(labels[name].detach().float().cpu())
    model.train()
    result = metrics.compute()
    columns = {key: torch.cat(values) for key, values in kept.items()}
    rows = loader.row_order() if keep else None
    _add_grouped_auc(result, columns, rows, groups, task_kinds, device)
    if predictions_out is not None:
        real = rows >= 0
        predictions_out["row"] = rows[real]
        predictions_out.update({key: values.numpy()[real] for key, values in columns.items()})
    if rank_rows_out is not None:
        rank_rows_out["row"] = rows
        rank_rows_out.update(columns)
    return result


def _add_grouped_auc(
    result: Dict[str, Dict[str, float]],
    columns: Dict[str, torch.Tensor],
    rows: Optional[np.ndarray],
    groups: Optional[np.ndarray],
    task_kinds: Dict[str, str],
    device: torch.device,
) -> None:
    """``gauc`` into each binary task's ``result`` when there are ``groups`` (one per row of the shards)."""
    binary = [name for name, kind in task_kinds.items() if kind == "binary"]
    if groups is None or not binary:
        return
    row_groups = torch.from_numpy(np.where(rows >= 0, groups[np.maximum(rows, 0)], -1))
    gauc = grouped_auc(
        {n: columns[f"{n}.prediction"] for n in binary}, {n: columns[f"{n}.label"] for n in binary}, row_groups,
        device,
    )  # fmt: skip
    for name, value in gauc.items():
        result[name]["gauc"] = value


def metrics_of_rank_rows(
    rank_rows: Dict[str, Any],
    task_kinds: Dict[str, str],
    batch_size: int,
    world_size: int,
    device: torch.device,
    groups: Optional[np.ndarray] = None,
) -> Dict[str, Dict[str, float]]:
    """``evaluate``'s metrics of this rank's rows as its ``rank_rows_out`` holds them (predictions replaced, say,
    by an ensemble's mean), reduced over ranks: the same updates in the same batches of ``batch_size`` (the
    loader's), so the same predictions give the same numbers to the last bit. The metrics run on ``device`` (the
    run's: a reduction over ranks gathers their states there). Call it on every rank."""
    rows = rank_rows["row"]
    metrics = TaskMetrics(task_kinds, batch_size, len(rows) * world_size, device, count_rows=True)
    for start in range(0, len(rows), batch_size):
        batch = slice(start, start + batch_size)
        metrics.update(
            {name: rank_rows[f"{name}.prediction"][batch] for name in task_kinds},
            {name: rank_rows[f"{name}.label"][batch] for name in task_kinds},
        )
    result = metrics.compute()
    _add_grouped_auc(result, rank_rows, rows, groups, task_kinds, device)
    return result
