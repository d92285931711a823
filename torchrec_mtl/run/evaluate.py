"""Scoring a prepared job's test rows: item segments (cold and warm), predictions gathered across ranks, threshold
metrics; and ``evaluate_checkpoint`` and ``evaluate_ensemble``, the ``torchrec-mtl evaluate`` entry points.

Example::

    >>> per_task = evaluate_checkpoint(load_config("configs/mmoe_synthetic.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from torchrec_mtl.config import JobConfig
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.data.splits import cold_item_rows
from torchrec_mtl.ensemble import check_members, mean_predictions
from torchrec_mtl.errors import EnsembleError
from torchrec_mtl.results import ceilings, format_ensemble_table, format_table, headline_first
from torchrec_mtl.run.prepare import PreparedJob, checkpoint_dir, claim_run_folder, prepare_job
from torchrec_mtl.train.checkpoint import TRAIN_STATE, CheckpointError, resolve_checkpoint
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed
from torchrec_mtl.train.loop import evaluate, metrics_of_rank_rows
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


def evaluate_ensemble(
    configs: Sequence[JobConfig], checkpoints: Sequence[str | Path], device: Optional[torch.device] = None
) -> Dict[str, Any]:
    """The test metrics of each checkpoint (``configs[i]``: the job config of ``checkpoints[i]``, e.g. the one it
    recorded) and of their ensemble: every task's predictions averaged over the members (torchrec_mtl.ensemble),
    scored as one model's. The members must share their schema, tasks and data (EnsembleError naming the first that
    does not, before anything is scored); each is scored in the first member's evaluation batches. At any world
    size; rank 0 prints the table and writes the first config's ``out_dir/evaluation.json``: ``tasks`` are the
    ensemble's, ``members`` each checkpoint's. Returns that document."""
    if not configs or len(configs) != len(checkpoints):
        raise ValueError(f"evaluate_ensemble: {len(configs)} configs for {len(checkpoints)} checkpoints")
    check_members(list(zip(checkpoints, configs)), evaluation=True)
    first = configs[0]
    # the same batches for every member: their rows as the metrics saw them then line up, padding included
    batch_size = first.training.eval_batch_size
    configs = [replace(c, training=replace(c.training, eval_batch_size=batch_size)) for c in configs]
    claim_run_folder(first)
    env = init_distributed(timeout_s=first.training.collective_timeout_s, device=device)
    members: List[ScoredCheckpoint] = []
    for config, checkpoint in zip(configs, checkpoints):
        job = prepare_job(config, env)
        members.append(score_checkpoint(job, checkpoint))
        task_kinds, groups, world_size = job.tasks.names, job.test_users(), job.env.world_size
        del job  # one member's model in memory at a time
    _check_same_labels(members)
    names = list(task_kinds)
    columns = [f"{name}.prediction" for name in names]
    averaged = mean_predictions([{key: m.rank_rows[key].numpy() for key in columns} for m in members])
    rank_rows = {**members[0].rank_rows, **{key: torch.from_numpy(values) for key, values in averaged.items()}}
    metrics = metrics_of_rank_rows(rank_rows, task_kinds, batch_size, world_size, env.device, groups)
    test = {**members[0].test, **mean_predictions([m.test for m in members], columns)}
    validation = None
    if members[0].validation is not None:
        validation = {**members[0].validation, **mean_predictions([m.validation for m in members], columns)}
    thresholded, warnings = thresholded_metrics(task_kinds, first.evaluation.threshold, test, validation)
    tasks = headline_first(metrics, ceilings(first.data.dir) or {}, task_kinds)
    for task, values in thresholded.items():
        tasks[task].update(values)
    document = {
        "tasks": tasks,
        "task_kinds": task_kinds,
        "members": [{"checkpoint": str(m.path), "step": m.step, "tasks": m.tasks} for m in members],
    }
    if env.is_main:
        out = claim_run_folder(first)
        (out / "evaluation.json").write_text(json.dumps(document, indent=2))
        labels = [f"{m.path} (step {m.step})" for m in members]
        print(format_ensemble_table(labels, [m.tasks for m in members], tasks))
        print(f"ensemble of {len(members)}:\n{format_table(tasks)}")
        for warning in [*(w for m in members for w in m.warnings), *warnings]:
            print(f"warning: {warning}")
    return document


def _check_same_labels(members: Sequence[ScoredCheckpoint]) -> None:
    """EnsembleError when a member's test labels are not the first's: checked configs can still hide other rows
    (a data folder preprocessed again in between)."""
    first = members[0]
    for member in members[1:]:
        for key, values in member.test.items():
            if key.endswith(".label") and not np.array_equal(values, first.test[key], equal_nan=True):
                raise EnsembleError(
                    f"--checkpoint {member.path}: its test rows' {key.removesuffix('.label')} labels differ from the "
                    f"first member's ({first.path}): the data changed between them; an ensemble scores the same rows"
                )
