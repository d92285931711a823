"""``run_job``: train and evaluate as a config says (the ``torchrec-mtl train`` entry point). Orchestration only:
preparation is torchrec_mtl.run.prepare, the loop torchrec_mtl.train, scoring torchrec_mtl.run.evaluate.

Writes to ``out_dir``: ``results.json`` (metrics, segments, curve, diagnostics, config; docs/results_json.md),
``predictions.npz`` (each test row's ``<task>.prediction`` and ``<task>.label``, for the report), ``train.log`` and
``checkpoints/`` (torchrec_mtl.train.checkpoint). Runs at any world size: alone (one gloo process) or under torchrun.

Example::

    >>> results = run_job(load_config("configs/mmoe_synthetic.yaml"))  # doctest: +SKIP
    >>> results["tasks"]["ctr"]["auc"], results["tasks"]["ctr"]["ceiling"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from torchrec_mtl.config import ConfigError, JobConfig, config_from_dict, config_to_dict
from torchrec_mtl.finetune import for_task
from torchrec_mtl.results import Results, ceilings, format_segment, format_table, headline_first
from torchrec_mtl.run.evaluate import evaluate_item_segments, gathered, task_threshold_metrics
from torchrec_mtl.run.prepare import PreparedJob, check_inputs, checkpoint_dir, claim_run_folder, prepare_job
from torchrec_mtl.run.selection import EpochValidator
from torchrec_mtl.train.board import RunBoard
from torchrec_mtl.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainingStopped,
    read_train_state,
    resolve_checkpoint,
)
from torchrec_mtl.train.diagnostics import GateMonitor, label_copy_warnings, leak_warnings
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed
from torchrec_mtl.train.loop import NonFiniteLoss, evaluate, train
from torchrec_mtl.train.resume import CheckpointTrigger, load_model_state, restore_run, resume_path, save_run
from torchrec_mtl.protocols import Gated, ReportsWeights, find


def _effective_weights(model: torch.nn.Module) -> Dict[str, float]:
    """Each loss term's multiplier at the end of training, as the objective's weighting reports it."""
    weighting = find(model, ReportsWeights)
    return weighting.effective_weights()


# keys that may differ between a checkpoint's config and the run resuming it: where it writes, what it shows,
# how tables are placed (DCP reshards), more epochs (which continue the run), and how the test rows are judged
_RESUMABLE_CHANGES = {"out_dir", "checkpoint", "training.epochs", "training.progress", "training.sharding_types",
                      "evaluation"}  # fmt: skip


def _config_changes(saved: Dict, current: Dict, prefix: str = "") -> List[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        if path in _RESUMABLE_CHANGES:
            continue
        before, after = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _config_changes(before, after, f"{path}.")
        elif before != after:
            changes.append(f"{path} ({before!r} -> {after!r})")
    return changes


def _start_finetuning(job: PreparedJob) -> Dict[str, Dict[str, float]]:
    """Load the joint checkpoint's weights and return every task's test metrics before fine-tuning."""
    finetune = job.config.finetune
    path = resolve_checkpoint(finetune.checkpoint)
    load_model_state(path, job.sharded)
    show = job.config.training.progress and job.env.is_main
    tasks = job.tasks.names
    test = evaluate(job.sharded, job.eval_pipeline, job.loader("test"), tasks, show, device=job.env.device)
    before = headline_first(test, kinds=tasks)
    if job.env.is_main:
        print(f"fine-tuning {finetune.task} from {path}, frozen: {', '.join(finetune.freeze) or 'nothing'}; "
              f"before:\n{format_table(before)}", flush=True)  # fmt: skip
    return before


def _resume(job: PreparedJob, checkpointer: Checkpointer, global_batch_rows: int):
    """The summary and curve window to continue from (restored into the model and optimizers), or None."""
    path = resume_path(checkpointer, job.config.checkpoint.resume)
    if path is None:
        return None
    saved = read_train_state(path).get("config", {})
    try:  # keys added to the config since the checkpoint was written take their defaults there
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        pass  # compared as written: the differences are named below
    changes = _config_changes(saved, config_to_dict(job.config))
    if changes:
        raise CheckpointError(
            f"checkpoint {path}: written by another config ({'; '.join(changes[:5])}); set checkpoint.resume=never "
            "to start over"
        )
    summary, window_batches, train_state = restore_run(
        path, job.sharded, job.optimizer, global_batch_rows, job.precision.scaler
    )
    if job.env.is_main:
        print(
            f"resuming from {path}: step {summary.steps}, epoch {summary.epoch + 1} batch {summary.batch}"
            + ("" if train_state["world_size"] == job.env.world_size else f" (written at world size "
               f"{train_state['world_size']}, resharded)"),
            flush=True,
        )  # fmt: skip
    return summary, window_batches


class _Tee:
    """A text stream writing to several (the console and the run's log file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno...: the console's
        return getattr(self.streams[0], name)


def run_job(
    config: JobConfig,
    env: Optional[DistributedEnv] = None,
    on_validation: Optional[Callable[[int, float], None]] = None,
) -> Results:
    """Train and evaluate as configured; rank 0 prints the plan, the curve points and the table, writes
    ``out_dir/results.json``, and appends what it prints to ``out_dir/train.log``.

    ``on_validation(point, score)`` is called after each validation point (numbered from 1) (``training.early_stopping``); an
    exception it raises (a tuning trial pruned, say) ends the run there."""
    check_inputs(config)  # every rank, before any work or collective: a missing file stops them all
    out = claim_run_folder(config)  # every rank: a refusal stops them all, before any collective
    env = env or init_distributed(timeout_s=config.training.collective_timeout_s)
    if not env.is_main:
        return _run_job(config, env, on_validation)
    with open(out / "train.log", "a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: training into {out} ({env.world_size} process(es))")
        return _run_job(config, env, on_validation)


def _run_job(
    config: JobConfig, env: DistributedEnv, on_validation: Optional[Callable[[int, float], None]] = None
) -> Results:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))))
    started = time.perf_counter()
    if config.finetune is not None:
        config = for_task(config, config.finetune.task)
    job = prepare_job(config, env)
    log, tasks, sharded, pipeline, objective = job.log, job.tasks, job.sharded, job.pipeline, job.objective
    training = config.training
    show = training.progress and env.is_main
    first = job.train_shards[0]  # checked before training: a copied label is worth knowing before hours of it
    warnings = label_copy_warnings(first.dense, first.sparse, first.labels, log.dense_features, job.single_id_features)
    gated = find(sharded, Gated)
    train_loader = job.loader("train")
    checkpointer = Checkpointer(checkpoint_dir(config), keep=config.checkpoint.keep)
    global_batch_rows = train_loader.batch_size * train_loader.world_size
    inputs = job.model_inputs()
    save = lambda summary, window, finished=False: save_run(  # noqa: E731
        checkpointer, sharded, job.optimizer, summary, window, global_batch_rows, config_to_dict(config), finished,
        inputs, job.precision.scaler,
    )  # fmt: skip
    before = _start_finetuning(job) if config.finetune is not None else None
    resume = _resume(job, checkpointer, global_batch_rows)
    trigger = CheckpointTrigger(
        save, config.checkpoint.every_steps, config.checkpoint.every_seconds, checkpointer=checkpointer
    )
    validator = None
    if training.early_stopping is not None:
        best = Checkpointer(checkpoint_dir(config) / "best", keep=1)
        state = {"config": config_to_dict(config), "model_inputs": inputs, "global_batch_rows": global_batch_rows}
        validator = EpochValidator(job, training.early_stopping, best, state, show, on_validation)
    board = RunBoard(Path(config.out_dir), training.epochs * len(train_loader)) if env.is_main else None
    try:
        summary = train(
            sharded,
            pipeline,
            train_loader,
            training.epochs,
            show_progress=show,
            task_kinds=tasks.names,
            curve_every=training.curve_every,
            gated_tower=gated,
            resume=resume,
            after_step=trigger,
            schedule=job.schedule,
            on_curve_point=board.curve_point if board is not None else None,
            validate=validator,
            validate_every=training.early_stopping.every_steps if training.early_stopping else 0,
            device=env.device,
        )
    except NonFiniteLoss as error:
        raise NonFiniteLoss(f"{error}; the last good checkpoint: {checkpointer.latest() or 'none yet'}") from None
    finally:
        trigger.close()
        if board is not None:
            board.flush()
    if summary.stopped:
        raise TrainingStopped(
            f"stopped by SIGTERM after step {summary.steps}; checkpoint {trigger.last_path}; run the same command "
            "again to continue from it"
        )
    if env.is_main and not summary.curve and training.curve_every > 0:
        print(f"no training curve: {summary.steps} steps, and a curve point is every {training.curve_every} "
              "(training.curve_every)", flush=True)  # fmt: skip
    selected = validator.selected(summary) if validator is not None else None
    if selected is not None:  # the selected epoch's model is the one tested, saved last and exported
        load_model_state(validator.best_path(summary), sharded)
        if env.is_main:
            print(
                f"selected step {selected['step']} (epoch {selected['epoch']}) of {summary.steps} by validation "
                f"{training.early_stopping.metric} {abs(selected['score']):.4f}"
                + (" (stopped early)" if summary.converged else ""),
                flush=True,
            )
    if config.checkpoint.at_end:
        save(summary, None, finished=True)
    with GateMonitor(gated) if gated is not None else contextlib.nullcontext() as monitor:
        predictions: Dict[str, np.ndarray] = {}
        metrics = evaluate(
            sharded, job.eval_pipeline, job.loader("test"), tasks.names, show, job.test_users(), predictions, env.device
        )
    predictions = gathered(predictions, env)
    segments = evaluate_item_segments(job)
    thresholded, threshold_warnings = task_threshold_metrics(job, predictions, show)
    cosine = objective.gradient_cosine
    warnings += (monitor.warnings() if monitor else []) + (cosine.warnings() if cosine else []) + leak_warnings(metrics)
    warnings += threshold_warnings

    per_task = headline_first(metrics, ceilings(config.data.dir) or {}, tasks.names)
    for task, values in thresholded.items():  # after the task's own metrics
        per_task[task].update(values)
    if board is not None:
        board.test_metrics(metrics, summary.steps)
        board.close()
    results: Results = {
        "tasks": per_task,
        "task_kinds": tasks.names,
        **({"finetune": {**config_to_dict(config)["finetune"], "before": before, "after": per_task}} if before else {}),
        "segments": {
            name: {"rows": rows, "tasks": headline_first(values, kinds=tasks.names)}
            for name, (rows, values) in segments.items()
        },
        "training": {
            "world_size": env.world_size,
            "rows": job.rows(),
            "steps": summary.steps,
            "samples_per_s": round(summary.samples_per_second, 1),
            "train_seconds": round(summary.seconds, 2),
            "epoch_losses": summary.losses,
            "curve": summary.curve,
            "effective_weights": _effective_weights(sharded),
            **({"validation": summary.validation, "selected": {k: selected[k] for k in ("epoch", "step", "score")},
                "stopped_early": summary.converged} if selected is not None else {}),  # fmt: skip
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        "diagnostics": {
            "gates": monitor.summary() if monitor else None,
            "gradient_cosine": cosine.summary() if cosine else None,  # this rank's training steps
            "warnings": warnings,
        },
        "config": config_to_dict(config),
    }
    if env.is_main:
        out = claim_run_folder(config)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        np.savez(out / "predictions.npz", **predictions)
        print(format_table(per_task))
        for name, segment in results["segments"].items():
            print(format_segment(name, segment))
        for warning in warnings:
            print(f"warning: {warning}")
        print(
            f"trained {summary.steps} steps at {summary.samples_per_second:,.0f} samples/s on {env.world_size} "
            f"process(es); results in {out / 'results.json'}"
        )
    return results
