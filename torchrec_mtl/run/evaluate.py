"""Scoring a prepared job's test rows: item segments (cold and warm), predictions gathered across ranks, threshold
metrics; and ``evaluate_checkpoint``, the ``torchrec-mtl evaluate`` entry point.

Example::

    >>> per_task = evaluate_checkpoint(load_config("configs/mmoe_synthetic.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from torchrec_mtl.config import JobConfig
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.data.splits import cold_item_rows
from torchrec_mtl.results import ceilings, format_table, headline_first
from torchrec_mtl.run.prepare import PreparedJob, checkpoint_dir, claim_run_folder, prepare_job
from torchrec_mtl.train.checkpoint import TRAIN_STATE, CheckpointError, resolve_checkpoint
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed
from torchrec_mtl.train.loop import evaluate
from torchrec_mtl.train.resume import load_model_state
from torchrec_mtl.train.thresholds import best_f1_threshold, threshold_metrics


def evaluate_item_segments(job: PreparedJob) -> Dict[str, Tuple[int, Dict[str, Dict[str, float]]]]:
    """The test metrics again on rows whose item never appears in training (``cold``) and on the rest (``warm``),
    when the schema names an item column; each with its row count."""
    item_column = job.log.metadata.get("item_id")
    if item_column is None:
        return {}
    cold = cold_item_rows(job.train_shards, job.test_shards, item_column)
    test = EncodedLog.concat(job.test_shards)
    segments = {}
    for name, mask in (("cold", cold), ("warm", ~cold)):
        if not mask.any():
            continue
        loader = BatchLoader(
            test.take(np.flatnonzero(mask)),
            job.features,
            job.config.training.eval_batch_size,
            job.env.rank,
            job.env.world_size,
            shuffle=False,
            pad_tail=True,
            pin_memory=job.pin_memory,
        )
        metrics = evaluate(job.sharded, job.eval_pipeline, loader, job.tasks.names, False, device=job.env.device)
        segments[name] = (int(mask.sum()), metrics)
    return segments


def gathered(predictions: Dict[str, np.ndarray], env: DistributedEnv) -> Dict[str, np.ndarray]:
    """Every rank's test predictions (``evaluate``'s ``predictions_out``), on rank 0, in the test set's row order."""
    if env.world_size > 1:
        parts: List[Optional[Dict[str, np.ndarray]]] = [None] * env.world_size
        dist.all_gather_object(parts, predictions)
        predictions = {key: np.concatenate([part[key] for part in parts]) for key in predictions}
    order = np.argsort(predictions["row"], kind="stable")
    return {key: values[order] for key, values in predictions.items() if key != "row"}


def validation_predictions(job: PreparedJob, show: bool) -> Dict[str, np.ndarray]:
    """The job's model's predictions of the validation rows (``gathered``): collectives, so call it on every rank."""
    validation: Dict[str, np.ndarray] = {}
    evaluate(job.sharded, job.eval_pipeline, job.loader("validation"), job.tasks.names, show, None, validation,
             job.env.device)  # fmt: skip
    return gathered(validation, job.env)


def thresholded_metrics(
    task_kinds: Dict[str, str],
    threshold: float | str,
    test: Dict[str, np.ndarray],
    validation: Optional[Dict[str, np.ndarray]] = None,
) -> Tuple[Dict[str, Dict[str, float]], List[str]]:
    """Each binary task's ``threshold_metrics`` on the ``test`` predictions at ``threshold`` or (``best_f1``) at the
    task's best-F1 threshold on the ``validation`` predictions, with a warning for a task that has no labelled
    validation row (it gets no threshold metrics)."""
    binary = [name for name, kind in task_kinds.items() if kind == "binary"]
    thresholds: Dict[str, float] = {name: threshold for name in binary}
    warnings = []
    if threshold == "best_f1":
        thresholds = {}
        for name in binary:
            labels = validation[f"{name}.label"]
            if np.isnan(labels).all():
                warnings.append(f"{name}: no validation row in its sample space; no best-F1 threshold")
                continue
            thresholds[name] = best_f1_threshold(validation[f"{name}.prediction"], labels)
    metrics = {
        name: threshold_metrics(test[f"{name}.prediction"], test[f"{name}.label"], value)
        for name, value in thresholds.items()
    }
    return metrics, warnings


def task_threshold_metrics(
    job: PreparedJob, test: Dict[str, np.ndarray], show: bool
) -> Tuple[Dict[str, Dict[str, float]], List[str]]:
    """Each binary task's ``threshold_metrics`` on the gathered ``test`` predictions (``gathered``), at
    ``evaluation.threshold`` or (``best_f1``) at the task's best-F1 threshold on the validation rows
    (``thresholded_metrics``). With ``best_f1`` every rank evaluates the validation rows (collectives), so call it on
    every rank."""
    threshold = job.config.evaluation.threshold
    validation = validation_predictions(job, show) if threshold == "best_f1" else None
    return thresholded_metrics(job.tasks.names, threshold, test, validation)


@dataclass
class ScoredCheckpoint:
    """A checkpoint's test scores and metrics, as ``evaluate_checkpoint`` reports them, and what an ensemble of it
    needs: its predictions, gathered and as this rank's metrics saw them, and those of the validation rows."""

    path: Path
    step: int
    tasks: Dict[str, Dict[str, float]]  # headline first, with the threshold metrics
    warnings: List[str]
    test: Dict[str, np.ndarray]  # ``gathered``: every test row, in the test set's order
    rank_rows: Dict[str, Any]  # ``evaluate``'s ``rank_rows_out``
    validation: Optional[Dict[str, np.ndarray]]  # with evaluation.threshold best_f1 only


def score_checkpoint(job: PreparedJob, checkpoint: str | Path) -> ScoredCheckpoint:
    """Load ``checkpoint``'s weights into the job's model and score the test rows (and the validation rows, for a
    best-F1 threshold). Collectives: call it on every rank."""
    path = resolve_checkpoint(checkpoint)
    if not (path / TRAIN_STATE).exists():
        raise CheckpointError(f"{path}: no checkpoint to evaluate (train first, or pass one)")
    step = load_model_state(path, job.sharded)["step"]  # the weights alone: evaluation needs no optimizer state
    config, env = job.config, job.env
    show = config.training.progress and env.is_main
    predictions: Dict[str, np.ndarray] = {}
    rank_rows: Dict[str, Any] = {}
    metrics = evaluate(
        job.sharded, job.eval_pipeline, job.loader("test"), job.tasks.names, show, job.test_users(), predictions,
        env.device, rank_rows,
    )  # fmt: skip
    test = gathered(predictions, env)
    threshold = config.evaluation.threshold
    validation = validation_predictions(job, show) if threshold == "best_f1" else None
    thresholded, warnings = thresholded_metrics(job.tasks.names, threshold, test, validation)  # as training's results
    tasks = headline_first(metrics, ceilings(config.data.dir) or {}, job.tasks.names)
    for task, values in thresholded.items():
        tasks[task].update(values)
    return ScoredCheckpoint(path, step, tasks, warnings, test, rank_rows, validation)


def evaluate_checkpoint(
    config: JobConfig, checkpoint: Optional[str] = None, device: Optional[torch.device] = None
) -> Dict[str, Dict[str, float]]:
    """The test metrics of a checkpoint (default: the newest in the config's checkpoint folder), at any world size,
    on ``device`` (``cpu``, ``cuda`` or ``cuda:N``; default: a GPU when CUDA is present, as training); rank 0 prints
    the table and writes ``out_dir/evaluation.json``."""
    claim_run_folder(config)
    env = init_distributed(timeout_s=config.training.collective_timeout_s, device=device)
    job = prepare_job(config, env)
    scored = score_checkpoint(job, checkpoint or checkpoint_dir(config))
    if env.is_main:
        out = claim_run_folder(config)
        document = {"checkpoint": str(scored.path), "step": scored.step, "tasks": scored.tasks,
                    "task_kinds": job.tasks.names}  # fmt: skip
        (out / "evaluation.json").write_text(json.dumps(document, indent=2))
        print(f"{scored.path} (step {scored.step}):\n{format_table(scored.tasks)}")
        for warning in scored.warnings:
            print(f"warning: {warning}")
    return scored.tasks
