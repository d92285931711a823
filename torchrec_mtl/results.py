"""The per-task results a run reports: each task's metrics with its headline metric first and its ceiling when the
data know it, and the text table printed at the end of a run. No torch: tools and the report use it too.

Example::

    >>> print(format_table(headline_first({"ctr": {"ne": 0.88, "auc": 0.76}})))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TypedDict

from torchrec_mtl.headline import headline


TaskMetrics = Dict[str, float]  # metric name -> value, the headline metric first (then "ceiling" when known)


class SegmentResults(TypedDict):
    rows: int  # test rows in the segment
    tasks: Dict[str, TaskMetrics]


class Diagnostics(TypedDict):
    gates: Optional[Dict[str, Any]]  # task -> {"entropy", "usage"}; None without a gated tower
    gradient_cosine: Optional[Dict[str, float]]  # "task|task" -> mean cosine; None when not measured
    warnings: List[str]


class Results(TypedDict, total=False):
    """``results.json`` as ``torchrec-mtl train`` writes it (docs/results_json.md); ``finetune`` only when the run
    fine-tuned a task."""

    tasks: Dict[str, TaskMetrics]  # task (or product) -> its test metrics
    task_kinds: Dict[str, str]  # task -> its kind (torchrec_mtl.task_kinds.KINDS)
    finetune: Dict[str, Any]  # the finetune section, with every task's metrics "before" and "after"
    segments: Dict[str, SegmentResults]  # "cold" and "warm" items
    training: Dict[str, Any]  # world_size, rows, steps, samples_per_s, seconds, epoch losses, curve, weights
    diagnostics: Diagnostics
    config: Dict[str, Any]  # the job config as run (config_to_dict)


def ceilings(data_dir: str) -> Optional[Dict[str, float]]:
    meta = Path(data_dir) / "meta.json"
    return json.loads(meta.read_text()).get("ceilings") if meta.exists() else None


# a binary task's metrics at its threshold (torchrec_mtl.run.evaluate.task_threshold_metrics), shown in a table of
# their own
THRESHOLD_KEYS = ("threshold", "precision", "recall", "f1")
# what a task's metrics were computed on (torchrec_mtl.train.metrics.TaskMetrics): shown in columns of their own
COUNT_KEYS = ("rows", "positives")
# an AUC over fewer positives (or negatives) than this is marked unreliable: one row moves it by over 1/30 of its range
RELIABLE_AUC_MIN_CLASS = 30


def unreliable(values: Dict[str, float]) -> Optional[str]:
    """Why a task's AUC means little (fewer than RELIABLE_AUC_MIN_CLASS positive or negative rows), or None."""
    if "auc" not in values or "positives" not in values:
        return None
    positives, negatives = int(values["positives"]), int(values["rows"] - values["positives"])
    if min(positives, negatives) >= RELIABLE_AUC_MIN_CLASS:
        return None
    return f"unreliable AUC: {positives} positive and {negatives} negative rows"


def format_table(tasks: Dict[str, Dict[str, float]]) -> str:
    """A per-task text table: headline metric beside its ceiling, then the other metrics; below it, for the tasks
    that have them, precision, recall and F1 at the task's threshold."""
    width = max([8, *(len(task) + 2 for task in tasks)])
    counted = any("rows" in values for values in tasks.values())
    count_header = f"{'rows':>10}{'positives':>10}" if counted else ""
    lines = [f"{'task':<{width}}{'metric':<8}{'value':>8}{'ceiling':>9}{'gap':>8}{count_header}   other"]
    for task, values in tasks.items():
        metric = headline(values)
        ceiling = values.get("ceiling")
        gap = "" if ceiling is None else f"{abs(ceiling - values[metric]):8.4f}"
        ceiling_text = "" if ceiling is None else f"{ceiling:9.4f}"
        counts = ""
        if counted:
            rows, positives = (values.get(key) for key in COUNT_KEYS)
            counts = "".join(f"{'' if n is None else f'{int(n):,}':>10}" for n in (rows, positives))
        skip = (metric, "ceiling", *THRESHOLD_KEYS, *COUNT_KEYS)
        others = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in skip)
        warning = unreliable(values)
        others = f"{others}  ({warning})".lstrip() if warning else others
        lines.append(f"{task:<{width}}{metric:<8}{values[metric]:8.4f}{ceiling_text:>9}{gap:>8}{counts}   {others}")
    thresholded = {task: values for task, values in tasks.items() if "f1" in values}
    if thresholded:
        lines.append(f"{'task':<{width}}{'threshold':>10}{'precision':>11}{'recall':>8}{'f1':>8}")
        for task, v in thresholded.items():
            lines.append(f"{task:<{width}}{v['threshold']:10.4f}{v['precision']:11.4f}{v['recall']:8.4f}{v['f1']:8.4f}")
    return "\n".join(lines)


def format_ensemble_table(
    members: Sequence[str], member_tasks: Sequence[Dict[str, Dict[str, float]]], ensemble: Dict[str, Dict[str, float]]
) -> str:
    """The headline metric of each task for each member of an ensemble (``members``: their names, e.g. checkpoint
    paths, listed above the table as ``member N``) beside the ensemble's (torchrec_mtl.run.evaluate_ensemble)."""
    width = max([8, *(len(task) + 2 for task in ensemble)])
    legend = [f"member {i}: {name}" for i, name in enumerate(members, start=1)]
    columns = [f"member {i}" for i in range(1, len(members) + 1)] + ["ensemble"]
    lines = [f"{'task':<{width}}{'metric':<8}" + "".join(f"{column:>10}" for column in columns)]
    for task, values in ensemble.items():
        metric = headline(values)
        row = [tasks[task].get(metric) for tasks in member_tasks] + [values[metric]]
        lines.append(f"{task:<{width}}{metric:<8}" + "".join(f"{'' if v is None else f'{v:.4f}':>10}" for v in row))
    return "\n".join([*legend, *lines])


def format_segment(name: str, segment: SegmentResults) -> str:
    """One line for a segment of the test rows (cold or warm items): each task's headline metric with the rows
    and positives it was computed on, and the unreliable AUCs marked."""
    parts = []
    for task, values in segment["tasks"].items():
        metric = headline(values)
        counts = [f"{int(values[key]):,} {key}" for key in COUNT_KEYS if key in values]
        warning = "; unreliable" if unreliable(values) else ""
        parts.append(f"{task} {metric} {values[metric]:.4f}" + (f" ({', '.join(counts)}{warning})" if counts else ""))
    return f"{name} items ({segment['rows']:,} test rows): {', '.join(parts)}"


def headline_first(
    metrics: Dict[str, Dict[str, float]],
    ceilings: Optional[Dict[str, float]] = None,
    kinds: Optional[Dict[str, str]] = None,
) -> Dict[str, Dict[str, float]]:
    """Each task's metrics with its headline metric (of its kind, from ``kinds``: task -> kind) first, and its
    ceiling when the data know it."""
    per_task = {}
    for task, values in metrics.items():
        metric = headline(values, (kinds or {}).get(task))
        ceiling = (ceilings or {}).get(f"{task}_{metric}")
        per_task[task] = {metric: values[metric], **({"ceiling": ceiling} if ceiling is not None else {})}
        per_task[task].update({k: v for k, v in values.items() if k != metric})
    return per_task
