"""The report's inputs and the numbers drawn from them: ``results.json`` and ``predictions.npz`` read and checked,
each task's kind, the curve's epoch boundaries, ROC points and equal-count bin means. No matplotlib, no HTML.

Every check raises ``ReportError`` naming the file, so ``torchrec-mtl report`` can print one line instead of a
traceback.
"""

from __future__ import annotations

import itertools
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from torchrec_mtl.headline import task_kind

CALIBRATION_BINS = 20

# task -> (prediction, label), both float64 and over the same rows
Predictions = Dict[str, Tuple[np.ndarray, np.ndarray]]


class ReportError(ValueError):
    """A run folder whose results cannot be reported (missing or malformed ``results.json`` or ``predictions.npz``)."""


def load_results(path: Path) -> Dict[str, Any]:
    """``results.json`` as a dict, checked far enough that every later step can rely on ``tasks``."""
    if not path.is_file():
        raise ReportError(f"{path}: not found (is this a training run's out_dir?)")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(results, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(results).__name__}")
    tasks = results.get("tasks")
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(v, dict) for v in tasks.values()):
        raise ReportError(f"{path}: 'tasks' must map each task name to its metrics, got {tasks!r:.200}")
    for key in ("segments", "training", "diagnostics", "config", "task_kinds"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            raise ReportError(f"{path}: '{key}' must be an object, got {type(results[key]).__name__}")
    # Any name is accepted as a kind: kinds can be registered beyond the three the report draws figures for.
    wrong = {t: k for t, k in (results.get("task_kinds") or {}).items() if not (isinstance(k, str) and k)}
    if wrong:
        raise ReportError(f"{path}: 'task_kinds' must map each task name to its kind's name, got {wrong!r:.200}")
    return results


def load_predictions(path: Path) -> Optional[Predictions]:
    """task -> (prediction, label) over the rows where both are finite; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            stored = {name: np.asarray(arrays[name], dtype=np.float64) for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ReportError(f"{path}: not a readable .npz ({error})") from error
    tasks = sorted({name.rsplit(".", 1)[0] for name in stored if name.endswith((".prediction", ".label"))})
    out = {}
    for task in tasks:
        if f"{task}.prediction" not in stored or f"{task}.label" not in stored:
            raise ReportError(f"{path}: task {task} needs both {task}.prediction and {task}.label")
        prediction, label = stored[f"{task}.prediction"].ravel(), stored[f"{task}.label"].ravel()
        if prediction.shape != label.shape:
            raise ReportError(f"{path}: {task}.prediction has {prediction.size} rows, {task}.label {label.size}")
        keep = np.isfinite(label) & np.isfinite(prediction)  # NaN label: the row is outside the task's sample space
        out[task] = (prediction[keep], label[keep])
    return out


def dig(mapping: Any, *keys: str, default: Any = None) -> Any:
    """``mapping[k1][k2]...``, or ``default`` where a level is missing: every section but ``tasks`` is optional."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return default if mapping is None else mapping


def number(value: Any) -> float:
    """``value`` as a float, NaN where it is none: a missing or malformed entry shows as a gap, not an error."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------------------------ task kinds


def task_kinds(results: Dict[str, Any]) -> Dict[str, Optional[str]]:
    """task -> its kind's name (``binary``, ``regression``, ``retrieval``...) or None (unknown), for every task.

    The kind ``results.json`` declares in ``task_kinds`` where it does; an older file has none, so the kind is then
    guessed from the task's metrics (``headline.task_kind``): an AUC says binary, so a retrieval task passes for one.
    """
    declared = results.get("task_kinds") or {}
    return {task: declared.get(task) or task_kind(metrics) for task, metrics in results["tasks"].items()}


def calibrated_tasks(results: Dict[str, Any]) -> List[str]:
    """The binary tasks whose scores are probabilities, so a calibration plot means something.

    A retrieval task's score is a cosine, not a probability: it has an AUC but no calibration. Where the kind is
    not declared, a task whose metrics lack ``calibration`` is taken for retrieval, as before ``task_kinds`` existed.
    """
    declared = results.get("task_kinds") or {}
    kinds = task_kinds(results)
    return [
        task
        for task, metrics in results["tasks"].items()
        if kinds[task] == "binary" and (task in declared or "calibration" in metrics)
    ]


# --------------------------------------------------------------------------------------------------------- numbers


def epoch_starts(results: Dict[str, Any]) -> List[Tuple[float, int]]:
    """(step, epoch) where each epoch after the first starts, between the two curve points that straddle it.

    Exact when every epoch took ``training.steps / epochs`` steps (a run that ran to its end); otherwise midway
    between the points.
    """
    curve = [point for point in dig(results, "training", "curve", default=[]) if isinstance(point, dict)]
    per_epoch = number(dig(results, "training", "steps")) / number(dig(results, "config", "training", "epochs"))
    starts = []
    for before, after in itertools.pairwise(curve):
        first, second = number(before.get("epoch")), number(after.get("epoch"))
        if not second > first:
            continue
        low, high = number(before.get("step")), number(after.get("step"))
        exact = per_epoch * (second - 1)
        starts.append((exact if low < exact <= high else (low + high) / 2, int(second)))
    return starts


def roc_points(label: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates at every distinct threshold (from (0, 0) to (1, 1)) and the area under them.

    Tied scores form one threshold, so ties count half, as in the usual AUC.
    """
    order = np.argsort(-score, kind="stable")
    score, positive = score[order], label[order] > 0.5
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    true_positives = np.cumsum(positive)[last_of_tie]
    false_positives = (last_of_tie + 1) - true_positives
    tpr = np.r_[0.0, true_positives / max(true_positives[-1], 1)]
    fpr = np.r_[0.0, false_positives / max(false_positives[-1], 1)]
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # by hand: numpy 1.x has no np.trapezoid
    return fpr, tpr, area


def binned_means(
    prediction: np.ndarray, target: np.ndarray, bins: int = CALIBRATION_BINS
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean prediction, mean target and row count in ``bins`` equal-count bins of the prediction.

    Equal-count bins rather than equal-width ones: a click model's predictions crowd near 0, where equal widths
    would leave one bin with nearly every row.
    """
    order = np.argsort(prediction, kind="stable")
    groups = [group for group in np.array_split(order, min(bins, prediction.size)) if group.size]
    return (
        np.array([prediction[g].mean() for g in groups]),
        np.array([target[g].mean() for g in groups]),
        np.array([g.size for g in groups]),
    )
