"""The report's text parts as HTML: the metric tables (overall and per item segment) and the run summary.

Every value goes through ``cell``, so numbers read alike in every table and no text from results.json reaches the
page unescaped.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchrec_mtl.headline import headline, task_kind
from torchrec_mtl.report.data import dig, number
from torchrec_mtl.results import unreliable


def cell(value: Any) -> str:
    """One table cell's HTML: thousands separated, floats to 4 places, NaN as a dash, text escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table of ``rows`` under ``header``, each value through ``cell``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value(values: Dict[str, float], metric: str) -> Any:
    """A task's headline value, marked when it is an AUC over too few positive or negative rows."""
    value = values.get(metric)
    return f"{cell(value)} (unreliable)" if unreliable(values) and value is not None else value


def _kind(task: str, metrics: Dict[str, float], kinds: Optional[Mapping[str, Optional[str]]]) -> str:
    """The task's kind for a table: from ``kinds`` where it names one, else guessed from the metrics, else ``?``."""
    return (kinds or {}).get(task) or task_kind(metrics) or "?"


def metrics_table(tasks: Dict[str, Dict[str, float]], kinds: Optional[Mapping[str, Optional[str]]] = None) -> str:
    """One row per task: its headline metric, the ceiling and the gap to it when known, then every other metric.

    ``kinds`` (``data.task_kinds``) names each task's kind; a task it lacks has its kind guessed from its metrics.
    """
    others = list(dict.fromkeys(m for v in tasks.values() for m in v if m not in (headline(v), "ceiling")))
    with_ceiling = any("ceiling" in v for v in tasks.values())
    rows = []
    for task, values in tasks.items():
        metric = headline(values)
        row = [task, _kind(task, values, kinds), metric, _value(values, metric)]
        if with_ceiling:
            ceiling = values.get("ceiling")
            row += [ceiling, abs(number(ceiling) - number(values.get(metric))) if ceiling is not None else None]
        rows.append(row + [values.get(m) for m in others])
    header = ["task", "kind", "metric", "value"] + (["ceiling", "gap"] if with_ceiling else []) + others
    return html_table(header, rows)


def segments_table(segments: Dict[str, Any], kinds: Optional[Mapping[str, Optional[str]]] = None) -> str:
    """One row per (segment, task); no ceilings, the data give one for the whole test set only. ``kinds`` as in
    ``metrics_table``: a segment's task is the run's task, of the same kind.
    """
    entries = [
        (name, dig(segment, "rows", default=""), task, values)
        for name, segment in segments.items()
        for task, values in (dig(segment, "tasks", default={}) or {}).items()
    ]
    others = list(dict.fromkeys(m for *_, v in entries for m in v if m not in (headline(v), "ceiling")))
    rows = [
        [name, count, task, _kind(task, values, kinds), headline(values), _value(values, headline(values))]
        + [values.get(m) for m in others]
        for name, count, task, values in entries
    ]
    return html_table(["segment", "rows", "task", "kind", "metric", "value"] + others, rows)


def _tower_text(config: Optional[Dict[str, Any]]) -> str:
    """The tower's kind, with its expert counts for the gated ones (mmoe, ple)."""
    tower = dig(config, "model", "tower", default={})
    kind = tower.get("kind", "unknown") if isinstance(tower, dict) else "unknown"
    if kind == "mmoe":
        return f"mmoe ({tower.get('num_experts')} experts)"
    if kind == "ple":
        return (
            f"ple ({tower.get('num_levels')} level(s), {tower.get('num_shared_experts')} shared + "
            f"{tower.get('num_task_experts')} per-task experts)"
        )
    return str(kind)


def _rounded(value: Any, pattern: str) -> Optional[str]:
    """``value`` formatted by ``pattern``; None (the summary leaves the line out) when results.json lacks it."""
    return None if value is None else pattern.format(number(value))


def run_summary(results: Dict[str, Any], run_dir: Path) -> List[Tuple[str, str]]:
    """(what, value) lines on how the run was trained; a line whose value results.json lacks is left out."""
    training, config = results.get("training") or {}, results.get("config") or {}
    rows = training.get("rows") if isinstance(training.get("rows"), dict) else {}
    weights = training.get("effective_weights") or {}
    lines = [
        ("run folder", str(run_dir)),
        ("tower", _tower_text(config)),
        ("tasks", ", ".join(results["tasks"])),
        ("weighting", dig(config, "objective", "weighting")),
        ("effective weights", ", ".join(f"{t} {number(w):.3g}" for t, w in weights.items()) or None),
        ("world size", training.get("world_size")),
        ("training rows", rows.get("train")),
        ("test rows", rows.get("test")),
        ("epochs", dig(config, "training", "epochs")),
        ("steps", training.get("steps")),
        ("batch size", dig(config, "training", "batch_size")),
        ("samples/s", _rounded(training.get("samples_per_s"), "{:,.0f}")),
        ("training seconds", _rounded(training.get("train_seconds"), "{:,.1f}")),
        ("epoch losses", ", ".join(f"{number(v):.4f}" for v in training.get("epoch_losses") or []) or None),
    ]
    return [(what, cell(value) if not isinstance(value, str) else value) for what, value in lines if value is not None]
