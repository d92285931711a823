"""A run's report: one self-contained HTML file that shows what ``results.json`` (and ``predictions.npz``) hold.

``write_report(run_dir)`` reads ``run_dir/results.json`` (required) and ``run_dir/predictions.npz`` (optional: for each
task ``t`` the float arrays ``t.prediction`` and ``t.label``, one entry per test row, the label NaN outside the task's
sample space) and writes ``run_dir/report.html``: the run summary, the metric tables (overall and per item segment),
the warnings, and the figures embedded as base64 PNG, so the file opens anywhere on its own. Each figure is also saved
beside it as a PNG in ``run_dir/report/`` (for a README):

- ``training_curves.png``: loss, and each task's headline metric (AUC or RMSE) over the training steps;
- ``roc.png``, ``calibration.png``: per binary task, from ``predictions.npz``;
- ``regression.png``: per regression task, mean actual against mean predicted value, from ``predictions.npz``;
- ``gate_usage.png``, ``gate_entropy.png``: per task, how the tower's gates share the rows among the experts.

A figure that cannot be drawn (no predictions, a tower without gates) is replaced by a note saying why; so is a task
absent from a figure it belongs in. A binary task is one whose metrics hold ``auc``; a regression task holds ``rmse``.

Example::

    >>> path = write_report("runs/main")  # doctest: +SKIP
    >>> path
    PosixPath('runs/main/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from torchrec_mtl.headline import headline, task_kind
from torchrec_mtl.outputs import check_folder, new_file, new_folder

PathLike = Union[str, Path]

# Every file name the report may write into its figures folder; the ones a rerun does not draw are removed, so the
# folder never shows a figure from an earlier state of the run.
# the first line of every report: a file that starts with it is one of ours, which a new report may replace
HTML_FIRST_LINE = "<!DOCTYPE html><!-- torchrec-mtl run report -->"
FIGURES = ("training_curves", "roc", "calibration", "regression", "gate_usage", "gate_entropy")
CALIBRATION_BINS = 20
# A ROC curve over 600k rows has as many points; this many draw the same line.
ROC_POINTS = 2000
PANELS_PER_ROW = 3
DPI = 100


class ReportError(ValueError):
    """A run folder whose results cannot be reported (missing or malformed ``results.json`` or ``predictions.npz``)."""


@dataclass
class FigureSection:
    """One drawn figure (its PNG bytes) or the reason it was not drawn, with notes on what it leaves out."""

    name: str
    title: str
    png: Optional[bytes] = None
    notes: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- inputs


def load_results(path: Path) -> Dict:
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
    for key in ("segments", "training", "diagnostics", "config"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            raise ReportError(f"{path}: '{key}' must be an object, got {type(results[key]).__name__}")
    return results


def load_predictions(path: Path) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
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


def _dig(mapping: Optional[Dict], *keys, default=None):
    """``mapping[k1][k2]...``, or ``default`` where a level is missing: every section but ``tasks`` is optional."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return default if mapping is None else mapping


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------------------- numbers


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


# --------------------------------------------------------------------------------------------------------- figures


def _new_figure(panels: int, width: float = 4.6, height: float = 3.8):
    """A figure of ``panels`` axes, at most PANELS_PER_ROW a row, with the spare axes of the last row removed.

    Figures come from ``matplotlib.figure.Figure`` on the Agg canvas rather than from pyplot: nothing is registered
    globally, so nothing is left open, and a caller's interactive backend (a notebook's) is left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # an optional dependency: the rest of the package runs without it
        raise ImportError("the run report draws its figures with matplotlib; pip install matplotlib") from error

    columns = min(panels, PANELS_PER_ROW)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for spare in axes[panels:]:
        spare.remove()
    return figure, list(axes[:panels])


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry: the PNG's bytes then depend on the data only, not on the matplotlib version.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    figure.clear()
    return buffer.getvalue()


def _outside_legend(axis) -> None:
    """A legend right of the axes: lines that span the whole step range leave no free corner inside them."""
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _log_ticks(axis, low: float, high: float) -> None:
    """Plain-number ticks on log axes: 1-2-5 steps over a short range, powers of ten over a long one.

    matplotlib labels minor ticks as ``2×10^-2`` when a range spans little more than a decade, and they collide.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    subs = (1.0, 2.0, 5.0) if high / low < 100 else (1.0,)
    for which in (axis.xaxis, axis.yaxis):
        which.set_major_locator(LogLocator(base=10, subs=subs))
        which.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        which.set_minor_formatter(NullFormatter())


def _colors(names: Sequence[str]) -> Dict[str, str]:
    """One colour per task, the same in every figure."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def epoch_starts(results: Dict) -> List[Tuple[float, int]]:
    """(step, epoch) where each epoch after the first starts, between the two curve points that straddle it.

    Exact when every epoch took ``training.steps / epochs`` steps (a run that ran to its end); otherwise midway
    between the points.
    """
    curve = [point for point in _dig(results, "training", "curve", default=[]) if isinstance(point, dict)]
    per_epoch = _number(_dig(results, "training", "steps")) / _number(_dig(results, "config", "training", "epochs"))
    starts = []
    for before, after in itertools.pairwise(curve):
        first, second = _number(before.get("epoch")), _number(after.get("epoch"))
        if not second > first:
            continue
        low, high = _number(before.get("step")), _number(after.get("step"))
        exact = per_epoch * (second - 1)
        starts.append((exact if low < exact <= high else (low + high) / 2, int(second)))
    return starts


def training_curves_figure(results: Dict) -> FigureSection:
    """Loss, then AUC of the binary tasks and RMSE of the regression tasks, against the training step."""
    out = FigureSection("training_curves", "Training curves")
    curve = [point for point in _dig(results, "training", "curve", default=[]) if isinstance(point, dict)]
    if not curve:
        out.notes.append("results.json has no training curve (training.curve is empty)")
        return out
    tasks = results["tasks"]
    colors = _colors(list(tasks))
    steps = np.array([_number(point.get("step")) for point in curve])
    groups = [
        (kind, metric, [t for t, m in tasks.items() if task_kind(m) == kind])
        for kind, metric in (("binary", "auc"), ("regression", "rmse"))
    ]
    groups = [group for group in groups if group[2]]
    figure, axes = _new_figure(1 + len(groups))

    axes[0].plot(steps, [_number(point.get("loss")) for point in curve], marker="o", markersize=3, color="black")
    axes[0].set(title="training loss", xlabel="step", ylabel="mean loss since the previous point")
    for step, epoch in epoch_starts(results):  # a new epoch explains a jump in the loss
        for axis in axes:
            axis.axvline(step, color="grey", linestyle=":", linewidth=1)
        axes[0].text(
            step,
            0.98,
            f" epoch {epoch}",
            transform=axes[0].get_xaxis_transform(),
            va="top",
            fontsize="small",
            color="dimgrey",
        )

    for axis, (kind, metric, names) in zip(axes[1:], groups):
        missing = []
        for task in names:
            values = np.array([_number(_dig(point, task, metric)) for point in curve])
            if np.all(np.isnan(values)):
                missing.append(task)
                continue
            axis.plot(steps, values, marker="o", markersize=3, color=colors[task], label=task)
            ceiling = tasks[task].get("ceiling")
            if ceiling is not None:
                axis.axhline(_number(ceiling), color=colors[task], linestyle="--", linewidth=1)
        # The curve's metrics are over the training batches just before each point, not over the test set.
        axis.set(title=f"{metric.upper()} on recent training batches", xlabel="step", ylabel=metric.upper())
        if any(tasks[t].get("ceiling") is not None for t in names):
            axis.plot([], [], color="grey", linestyle="--", linewidth=1, label="test ceiling")
        if len(missing) < len(names):
            _outside_legend(axis)
        if missing:
            axis.text(
                0.02,
                0.02,
                "not in the curve: " + ", ".join(missing),
                transform=axis.transAxes,
                fontsize="small",
                color="dimgrey",
            )
            out.notes.extend(f"task {task}: no {metric.upper()} in the training curve" for task in missing)
    for task, metrics in tasks.items():
        if task_kind(metrics) is None:
            out.notes.append(f"task {task}: neither auc nor rmse in results.json, so no curve is drawn for it")
    out.png = _png(figure)
    return out


def _prediction_panels(
    name: str,
    title: str,
    tasks: List[str],
    predictions: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]],
    source: Path,
    draw,
) -> FigureSection:
    """One panel per task drawn by ``draw(axis, task, prediction, label) -> note or None``; notes for the rest."""
    out = FigureSection(name, title)
    if not tasks:
        return out
    if predictions is None:
        out.notes.append(f"no predictions.npz in {source.parent}")
        return out
    drawable = []
    for task in tasks:
        if task not in predictions:
            out.notes.append(f"task {task}: not in {source.name}")
        elif predictions[task][0].size == 0:
            out.notes.append(f"task {task}: no rows with a label in {source.name}")
        else:
            drawable.append(task)
    if not drawable:
        return out
    figure, axes = _new_figure(len(drawable), width=4.2, height=4.0)
    for axis, task in zip(axes, drawable):
        note = draw(axis, task, *predictions[task])
        if note:
            out.notes.append(f"task {task}: {note}")
    out.png = _png(figure)
    return out


def _draw_roc(axis, task: str, prediction: np.ndarray, label: np.ndarray) -> Optional[str]:
    positives = int((label > 0.5).sum())
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    axis.set(
        title=f"{task} ({label.size:,} rows)",
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1),
        aspect="equal",
    )
    if positives in (0, label.size):
        axis.text(0.5, 0.5, "one class only: no ROC", ha="center", transform=axis.transAxes)
        return f"every one of its {label.size:,} labels is {int(label[0] > 0.5)}, so it has no ROC curve"
    fpr, tpr, auc = roc_points(label, prediction)
    keep = np.unique(np.linspace(0, fpr.size - 1, min(fpr.size, ROC_POINTS)).round().astype(int))
    axis.plot(fpr[keep], tpr[keep], color="C0", label=f"AUC {auc:.4f}")
    axis.legend(loc="lower right")
    return None


def _draw_calibration(axis, task: str, prediction: np.ndarray, label: np.ndarray) -> Optional[str]:
    predicted, observed, counts = binned_means(prediction, label)
    # Binomial standard error of each bin's rate: it tells a miscalibrated bin from a small noisy one.
    error = np.sqrt(np.clip(observed * (1 - observed), 0, None) / counts)
    note = None
    # Rare events (a 1% CTR) crowd most bins into the corner of linear axes; log axes spread them out.
    logarithmic = predicted.min() > 0 and predicted.max() > 10 * predicted.min()
    if logarithmic:
        shown = observed > 0
        if not shown.all():
            note = f"{int((~shown).sum())} calibration bin(s) with no positive row left off its log axes"
        low = float(min(predicted.min(), observed[shown].min(initial=np.inf))) / 1.5
        high = float(max(predicted.max(), observed.max())) * 1.5
        axis.set(xscale="log", yscale="log")
        predicted, observed, error = predicted[shown], observed[shown], error[shown]
    else:
        low, high = 0.0, float(max(predicted.max(), observed.max())) * 1.08 or 1.0
    axis.plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    axis.errorbar(
        predicted,
        observed,
        yerr=error,
        marker="o",
        markersize=4,
        color="C1",
        linewidth=1,
        capsize=2,
        label=f"{len(counts)} equal-count bins",
    )
    ratio = prediction.sum() / max(label.sum(), 1e-12)
    scale = " (log scale)" if logarithmic else ""
    axis.set(
        title=f"{task}: predicted / observed = {ratio:.3f}",
        xlabel=f"mean predicted probability{scale}",
        ylabel=f"observed positive rate{scale}",
        xlim=(low, high),
        ylim=(low, high),
        aspect="equal",
    )
    if logarithmic:
        _log_ticks(axis, low, high)
    axis.legend(loc="upper left", fontsize="small")
    return note


def _draw_regression(axis, task: str, prediction: np.ndarray, label: np.ndarray) -> Optional[str]:
    predicted, actual, counts = binned_means(prediction, label)
    low = float(min(predicted.min(), actual.min()))
    high = float(max(predicted.max(), actual.max()))
    pad = 0.05 * (high - low or 1.0)
    axis.plot(
        [low - pad, high + pad],
        [low - pad, high + pad],
        color="grey",
        linestyle=":",
        linewidth=1,
        label="predicted = actual",
    )
    axis.plot(predicted, actual, marker="o", markersize=4, color="C2", label=f"{len(counts)} equal-count bins")
    rmse = float(np.sqrt(np.mean((prediction - label) ** 2)))
    axis.set(
        title=f"{task} ({label.size:,} rows, RMSE {rmse:.4f})",
        xlabel="mean predicted value",
        ylabel="mean actual value",
        xlim=(low - pad, high + pad),
        ylim=(low - pad, high + pad),
        aspect="equal",
    )
    axis.legend(loc="upper left", fontsize="small")
    return None


def roc_figure(tasks: List[str], predictions, source: Path) -> FigureSection:
    return _prediction_panels("roc", "ROC curves (binary tasks)", tasks, predictions, source, _draw_roc)


def calibration_figure(tasks: List[str], predictions, source: Path) -> FigureSection:
    return _prediction_panels(
        "calibration", "Calibration (binary tasks)", tasks, predictions, source, _draw_calibration
    )


def regression_figure(tasks: List[str], predictions, source: Path) -> FigureSection:
    return _prediction_panels(
        "regression", "Predicted against actual (regression tasks)", tasks, predictions, source, _draw_regression
    )


def expert_names(config: Optional[Dict], num_experts: int) -> List[str]:
    """Column names of a gate's usage: PLE gates weigh the task's own experts first, then the shared ones."""
    own = _dig(config, "model", "tower", "num_task_experts")
    if _dig(config, "model", "tower", "kind") == "ple" and isinstance(own, int) and 0 < own < num_experts:
        return [f"own {i}" for i in range(own)] + [f"shared {i}" for i in range(num_experts - own)]
    return [f"expert {i}" for i in range(num_experts)]


def _gate_notes(results: Dict, gated: Sequence[str]) -> List[str]:
    """Why a task has no gate: a product of other tasks' outputs (ctcvr) has none of its own."""
    products = _dig(results, "config", "objective", "products", default={})
    notes = []
    for task in results["tasks"]:
        if task in gated:
            continue
        parts = _dig(products, task, "of")
        reason = f"a product of {' × '.join(parts)}, it has no gate of its own" if parts else "no gate recorded"
        notes.append(f"task {task}: {reason}")
    return notes


def gate_usage_figure(results: Dict) -> FigureSection:
    """Heatmap of each task's mean gate weight per expert over the test rows."""
    out = FigureSection("gate_usage", "Gate usage per expert (test rows)")
    gates = _dig(results, "diagnostics", "gates")
    tower = _dig(results, "config", "model", "tower", "kind", default="unknown")
    tasks = [task for task in gates or {} if isinstance(_dig(gates, task, "usage"), list) and gates[task]["usage"]]
    if not tasks:
        out.notes.append(f"no gates recorded (diagnostics.gates is empty): the {tower} tower has none to show")
        return out
    width = max(len(gates[task]["usage"]) for task in tasks)
    usage = np.full((len(tasks), width), np.nan)
    for row, task in enumerate(tasks):
        usage[row, : len(gates[task]["usage"])] = [_number(v) for v in gates[task]["usage"]]
    figure, (axis,) = _new_figure(1, width=max(4.5, 1.1 * width + 2.5), height=max(2.5, 0.6 * len(tasks) + 1.6))
    image = axis.imshow(usage, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (row, column), value in np.ndenumerate(usage):
        if not np.isnan(value):  # dark text on the light end of viridis, light on the dark end
            axis.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="black" if value > 0.6 else "white",
                fontsize="small",
            )
    axis.set_xticks(range(width), expert_names(results.get("config"), width))
    axis.set_yticks(range(len(tasks)), [f"{t} (H={_number(gates[t].get('entropy')):.2f})" for t in tasks])
    axis.set_title(f"mean gate weight ({tower}; H = gate entropy in nats, uniform = {math.log(width):.2f})")
    figure.colorbar(image, ax=axis, label="share of the task's rows")
    out.notes.extend(_gate_notes(results, tasks))
    out.png = _png(figure)
    return out


def gate_entropy_figure(results: Dict) -> FigureSection:
    """Each task's mean gate entropy over the training steps, against the entropy of a uniform gate."""
    out = FigureSection("gate_entropy", "Gate entropy during training")
    curve = [point for point in _dig(results, "training", "curve", default=[]) if isinstance(point, dict)]
    tasks = list(dict.fromkeys(task for point in curve for task in (_dig(point, "gates", default={}) or {})))
    if not tasks:
        out.notes.append("the training curve records no gates (a tower without gates, or an older run)")
        return out
    colors = _colors(list(results["tasks"]) + [t for t in tasks if t not in results["tasks"]])
    steps = np.array([_number(point.get("step")) for point in curve])
    figure, (axis,) = _new_figure(1, width=6.5, height=3.8)
    width = 0
    for task in tasks:
        entropy = [_number(_dig(point, "gates", task, "entropy")) for point in curve]
        axis.plot(steps, entropy, marker="o", markersize=3, color=colors[task], label=task)
        width = max([width] + [len(_dig(point, "gates", task, "usage", default=[])) for point in curve])
    if width > 1:
        axis.axhline(math.log(width), color="grey", linestyle=":", linewidth=1, label=f"uniform over {width}")
    axis.set(
        title="gate entropy (nats): lower = fewer experts per row", xlabel="step", ylabel="entropy", ylim=(0, None)
    )
    _outside_legend(axis)
    out.notes.extend(_gate_notes(results, tasks))
    out.png = _png(figure)
    return out


# ------------------------------------------------------------------------------------------------------------ HTML


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metrics_table(tasks: Dict[str, Dict[str, float]]) -> str:
    """One row per task: its headline metric, the ceiling and the gap to it when known, then every other metric."""
    others = list(dict.fromkeys(m for v in tasks.values() for m in v if m not in (headline(v), "ceiling")))
    with_ceiling = any("ceiling" in v for v in tasks.values())
    rows = []
    for task, values in tasks.items():
        metric = headline(values)
        row = [task, task_kind(values) or "?", metric, values.get(metric)]
        if with_ceiling:
            ceiling = values.get("ceiling")
            row += [ceiling, abs(_number(ceiling) - _number(values.get(metric))) if ceiling is not None else None]
        rows.append(row + [values.get(m) for m in others])
    header = ["task", "kind", "metric", "value"] + (["ceiling", "gap"] if with_ceiling else []) + others
    return _table(header, rows)


def segments_table(segments: Dict) -> str:
    """One row per (segment, task); no ceilings, the data give one for the whole test set only."""
    entries = [
        (name, _dig(segment, "rows", default=""), task, values)
        for name, segment in segments.items()
        for task, values in (_dig(segment, "tasks", default={}) or {}).items()
    ]
    others = list(dict.fromkeys(m for *_, v in entries for m in v if m not in (headline(v), "ceiling")))
    rows = [
        [name, count, task, task_kind(values) or "?", headline(values), values.get(headline(values))]
        + [values.get(m) for m in others]
        for name, count, task, values in entries
    ]
    return _table(["segment", "rows", "task", "kind", "metric", "value"] + others, rows)


def _tower_text(config: Optional[Dict]) -> str:
    tower = _dig(config, "model", "tower", default={})
    kind = tower.get("kind", "unknown") if isinstance(tower, dict) else "unknown"
    if kind == "mmoe":
        return f"mmoe ({tower.get('num_experts')} experts)"
    if kind == "ple":
        return (
            f"ple ({tower.get('num_levels')} level(s), {tower.get('num_shared_experts')} shared + "
            f"{tower.get('num_task_experts')} per-task experts)"
        )
    return str(kind)


def _rounded(value, pattern: str) -> Optional[str]:
    return None if value is None else pattern.format(_number(value))


def run_summary(results: Dict, run_dir: Path) -> List[Tuple[str, str]]:
    """(what, value) lines on how the run was trained; a line whose value results.json lacks is left out."""
    training, config = results.get("training") or {}, results.get("config") or {}
    rows = training.get("rows") if isinstance(training.get("rows"), dict) else {}
    weights = training.get("effective_weights") or {}
    lines = [
        ("run folder", str(run_dir)),
        ("tower", _tower_text(config)),
        ("tasks", ", ".join(results["tasks"])),
        ("weighting", _dig(config, "objective", "weighting")),
        ("effective weights", ", ".join(f"{t} {_number(w):.3g}" for t, w in weights.items()) or None),
        ("world size", training.get("world_size")),
        ("training rows", rows.get("train")),
        ("test rows", rows.get("test")),
        ("epochs", _dig(config, "training", "epochs")),
        ("steps", training.get("steps")),
        ("batch size", _dig(config, "training", "batch_size")),
        ("samples/s", _rounded(training.get("samples_per_s"), "{:,.0f}")),
        ("training seconds", _rounded(training.get("train_seconds"), "{:,.1f}")),
        ("epoch losses", ", ".join(f"{_number(v):.4f}" for v in training.get("epoch_losses") or []) or None),
    ]
    return [(what, _cell(value) if not isinstance(value, str) else value) for what, value in lines if value is not None]


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1.2em; }
dt { font-weight: 600; } dd { margin: 0; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; }
.note { color: #666; font-style: italic; margin: .3em 0; }
.warning { color: #9a3412; }
"""


def _figure_html(figure: FigureSection) -> str:
    parts = [f"<h2>{html.escape(figure.title)}</h2>"]
    if figure.png is not None:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(f'<img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">')
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in figure.notes]
    return "\n".join(parts)


def render_html(results: Dict, run_dir: Path, figures: Sequence[FigureSection]) -> str:
    """The whole page: summary, tables, warnings, then the figures (embedded, so the file stands alone)."""
    summary = "".join(
        f"<dt>{html.escape(what)}</dt><dd>{html.escape(value)}</dd>" for what, value in run_summary(results, run_dir)
    )
    parts = [f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>", f"<dl>{summary}</dl>"]
    parts += ["<h2>Test metrics</h2>", metrics_table(results["tasks"])]
    segments = results.get("segments") or {}
    if segments:
        parts += ["<h2>Test metrics by item segment</h2>", segments_table(segments)]
    cosine = _dig(results, "diagnostics", "gradient_cosine", default={})
    if cosine:
        parts += [
            "<h2>Gradient cosine between tasks (shared tower parameters)</h2>",
            _table(["tasks", "mean cosine"], [[pair.replace("|", " & "), _number(v)] for pair, v in cosine.items()]),
        ]
    warnings = _dig(results, "diagnostics", "warnings", default=[])
    parts.append("<h2>Warnings</h2>")
    if warnings:
        parts.append("<ul>" + "".join(f'<li class="warning">{html.escape(str(w))}</li>' for w in warnings) + "</ul>")
    else:
        parts.append('<p class="note">none</p>')
    parts += [_figure_html(figure) for figure in figures]
    return (
        f'{HTML_FIRST_LINE}\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Run report: {html.escape(run_dir.resolve().name)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        "<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_report(run_dir: PathLike, out: Optional[PathLike] = None) -> Path:
    """Write the run's HTML report (default ``run_dir/report.html``) and its figures as PNG in a folder beside it.

    The folder is named after the HTML file without its suffix: ``run_dir/report/`` for the default. Returns the
    HTML file's path. Raises ``ReportError`` when ``results.json`` (or a present ``predictions.npz``) is missing or
    malformed.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    results = load_results(run_dir / "results.json")
    source = run_dir / "predictions.npz"
    predictions = load_predictions(source)
    tasks = results["tasks"]
    binary = [task for task, metrics in tasks.items() if task_kind(metrics) == "binary"]
    regression = [task for task, metrics in tasks.items() if task_kind(metrics) == "regression"]
    figures = [
        training_curves_figure(results),
        roc_figure(binary, predictions, source),
        # a retrieval task's score is a cosine, not a probability: it has an AUC but no calibration
        calibration_figure([t for t in binary if "calibration" in tasks[t]], predictions, source),
        regression_figure(regression, predictions, source),
        gate_usage_figure(results),
        gate_entropy_figure(results),
    ]
    figures = [f for f in figures if f.png is not None or f.notes]  # a run without regression tasks: no section

    folder = out.with_suffix("") if out.suffix else out.parent / f"{out.name}_figures"
    inputs = [run_dir / "results.json", source]
    check_folder(folder, "report", inputs, option="--out (its figures folder)")
    with new_file(out, inputs, ours_if_starts_with=HTML_FIRST_LINE) as page:
        with new_folder(folder, "report", inputs, option="--out (its figures folder)") as pngs:
            for figure in figures:
                if figure.png is not None:
                    (pngs / f"{figure.name}.png").write_bytes(figure.png)
        page.write(render_html(results, run_dir, figures))
    return out
