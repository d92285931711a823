"""Model selection on the validation rows: after each epoch (and every ``every_steps`` steps), score the model on
them, keep the best point's weights and stop once the score has not improved for ``patience`` points in a row
(``training.early_stopping``).

The score is one number, higher is better: a task's metric (``ctr.auc``; a metric where lower is better, such as
``rating.rmse``, is negated) or ``mean_auc`` over the binary tasks and products. The best epoch is the first whose
score beats every earlier one by more than ``min_delta`` (``best_epoch``: the best point; the name predates points
inside an epoch), as a scan of the validation curve finds it.

Example::

    >>> curve = [{"score": 0.70}, {"score": 0.72}, {"score": 0.71}, {"score": 0.72}]
    >>> best_epoch(curve, min_delta=0.0), epochs_without_improvement(curve, min_delta=0.0)
    (1, 2)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from torchrec_mtl.config import ConfigError, EarlyStoppingConfig
from torchrec_mtl.task_kinds import KINDS
from torchrec_mtl.train.checkpoint import Checkpointer
from torchrec_mtl.train.loop import TrainSummary, evaluate

# metrics where a smaller value is better (the rest: larger); a kind's headline says so itself (task_kinds)
LOWER_IS_BETTER = {"rmse", "mse", "mae", "ne"}


def selection_score(metrics: Dict[str, Dict[str, float]], kinds: Dict[str, str], metric: str) -> float:
    """``metric`` of ``metrics`` (task -> its metrics) as one number where higher is better."""
    if metric == "mean_auc":
        aucs = [metrics[task]["auc"] for task, kind in kinds.items() if kind == "binary" and "auc" in metrics[task]]
        if not aucs:
            raise ConfigError("training.early_stopping.metric: mean_auc, but no binary task has an AUC to average")
        return sum(aucs) / len(aucs)
    task, _, name = metric.partition(".")
    if name not in metrics.get(task, {}):
        raise ConfigError(
            f"training.early_stopping.metric: {metric!r}; task {task} reports {', '.join(metrics.get(task, {}))}"
        )
    kind = KINDS.get(kinds.get(task, ""))
    lower_better = (not kind.higher_is_better) if kind is not None and name == kind.headline else name in LOWER_IS_BETTER
    return -metrics[task][name] if lower_better else metrics[task][name]


def best_epoch(curve: List[Dict[str, Any]], min_delta: float) -> int:
    """The index in ``curve`` (one entry per validated epoch, each with its ``score``) of the selected epoch: the
    first, then each later one that beats the selected one's score by more than ``min_delta``."""
    best = 0
    for index, point in enumerate(curve):
        if point["score"] > curve[best]["score"] + min_delta:
            best = index
    return best


def epochs_without_improvement(curve: List[Dict[str, Any]], min_delta: float) -> int:
    return len(curve) - 1 - best_epoch(curve, min_delta) if curve else 0


class EpochValidator:
    """``validate`` hook of torchrec_mtl.train.loop.train: scores the model on the validation rows (every rank
    calls it: the evaluation is collective), records the point in ``summary.validation``, writes the model to the
    ``best`` checkpointer when it is the new best, and asks to stop after ``patience`` epochs without improvement.

    Args:
        job: the prepared job (torchrec_mtl.run.prepare.PreparedJob).
        config: ``training.early_stopping``.
        best: where the best epoch's model goes (a Checkpointer keeping 1).
        train_state: what a checkpoint records beside the tensors (the config and the model inputs), so that the
            best checkpoint serves predict and export like any other.
        on_validation: called with each point's number (1, 2, ...: the epoch, when validating once an epoch) and
            score after it is recorded (torchrec_mtl.tune reports trials with it); an exception from it ends the run.
    """

    def __init__(
        self,
        job: Any,
        config: EarlyStoppingConfig,
        best: Checkpointer,
        train_state: Dict[str, Any],
        show: bool,
        on_validation: Optional[Callable[[int, float], None]] = None,
    ) -> None:
        self.job, self.config, self.best, self.train_state, self.show = job, config, best, train_state, show
        self.on_validation = on_validation

    def __call__(self, summary: TrainSummary) -> bool:
        job = self.job
        kinds = job.tasks.names
        loader = job.loader("validation")
        metrics = evaluate(job.sharded, job.eval_pipeline, loader, kinds, self.show, device=job.env.device)
        score = selection_score(metrics, kinds, self.config.metric)
        if not summary.validation and job.env.is_main:
            # a run starting over (not resumed): a best model of an earlier run in this folder is not this run's
            for stale in self.best.complete():
                shutil.rmtree(stale)
        # the epoch the point lies in, counted from 1: the one just finished, or the one in progress
        epoch = summary.epoch + (1 if summary.batch else 0)
        summary.validation.append({"epoch": epoch, "step": summary.steps, "score": score, "tasks": metrics})
        if best_epoch(summary.validation, self.config.min_delta) == len(summary.validation) - 1:
            state = {"model": job.sharded.state_dict()}
            self.best.save(summary.steps, state, {**self.train_state, "summary": summary.to_dict(), "finished": True})
        waited = epochs_without_improvement(summary.validation, self.config.min_delta)
        if job.env.is_main:
            rows = max((int(values.get("rows", 0)) for values in metrics.values()), default=0)
            where = f"at step {summary.steps} (epoch {epoch})" if summary.batch else f"after epoch {epoch} (step {summary.steps})"
            print(
                f"validation {where}: {self.config.metric} {abs(score):.4f} on {rows:,} rows"
                + (f"; no better for {waited} point(s)" if waited else "; the best so far"),
                flush=True,
            )
        if self.on_validation is not None:
            self.on_validation(len(summary.validation), score)
        return waited >= self.config.patience

    def selected(self, summary: TrainSummary) -> Optional[Dict[str, Any]]:
        """The selected epoch's validation point, or None before any."""
        if not summary.validation:
            return None
        return summary.validation[best_epoch(summary.validation, self.config.min_delta)]

    def best_path(self, summary: TrainSummary) -> Optional[Path]:
        """The checkpoint of the selected epoch's model, or None before any."""
        point = self.selected(summary)
        return self.best.directory / f"step-{point['step']:09d}" if point is not None else None
