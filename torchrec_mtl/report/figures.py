"""The report's figures: the training curves and the gates' use of the experts, drawn from ``results.json``, and
``draw_figures``, which gathers them with the prediction figures (``panels``) in the order the report shows them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from torchrec_mtl.report.canvas import FigureSection, new_figure, outside_legend, png_bytes, task_colors
from torchrec_mtl.report.data import Predictions, calibrated_tasks, dig, epoch_starts, number, task_kinds
from torchrec_mtl.report.panels import calibration_figure, regression_figure, roc_figure

# Every file name the report may write into its figures folder; the ones a rerun does not draw are removed, so the
# folder never shows a figure from an earlier state of the run.
FIGURES = ("training_curves", "roc", "calibration", "regression", "gate_usage", "gate_entropy")

# The curve panel each kind's tasks are drawn in, by the metric it shows: a retrieval task has an AUC too.
CURVE_METRICS = (("auc", ("binary", "retrieval")), ("rmse", ("regression",)))


def draw_figures(results: Dict[str, Any], predictions: Optional[Predictions], source: Path) -> List[FigureSection]:
    """Every figure of FIGURES, in that order, less those with neither a drawing nor a note (no regression task)."""
    kinds = task_kinds(results)
    figures = [
        training_curves_figure(results),
        roc_figure([t for t, kind in kinds.items() if kind in ("binary", "retrieval")], predictions, source),
        calibration_figure(calibrated_tasks(results), predictions, source),
        regression_figure([t for t, kind in kinds.items() if kind == "regression"], predictions, source),
        gate_usage_figure(results),
        gate_entropy_figure(results),
    ]
    return [f for f in figures if f.png is not None or f.notes]


def training_curves_figure(results: Dict[str, Any]) -> FigureSection:
    """Loss, then AUC of the binary (and retrieval) tasks and RMSE of the regression tasks, against the step."""
    out = FigureSection("training_curves", "Training curves")
    curve = [point for point in dig(results, "training", "curve", default=[]) if isinstance(point, dict)]
    if not curve:
        out.notes.append("results.json has no training curve (training.curve is empty)")
        return out
    tasks, kinds = results["tasks"], task_kinds(results)
    colors = task_colors(list(tasks))
    steps = np.array([number(point.get("step")) for point in curve])
    groups = [(metric, [t for t in tasks if kinds[t] in shown]) for metric, shown in CURVE_METRICS]
    groups = [group for group in groups if group[1]]
    figure, axes = new_figure(1 + len(groups))

    axes[0].plot(steps, [number(point.get("loss")) for point in curve], marker="o", markersize=3, color="black")
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

    for axis, (metric, names) in zip(axes[1:], groups):
        missing = []
        for task in names:
            values = np.array([number(dig(point, task, metric)) for point in curve])
            if np.all(np.isnan(values)):
                missing.append(task)
                continue
            axis.plot(steps, values, marker="o", markersize=3, color=colors[task], label=task)
            ceiling = tasks[task].get("ceiling")
            if ceiling is not None:
                axis.axhline(number(ceiling), color=colors[task], linestyle="--", linewidth=1)
        # The curve's metrics are over the training batches just before each point, not over the test set.
        axis.set(title=f"{metric.upper()} on recent training batches", xlabel="step", ylabel=metric.upper())
        if any(tasks[t].get("ceiling") is not None for t in names):
            axis.plot([], [], color="grey", linestyle="--", linewidth=1, label="test ceiling")
        if len(missing) < len(names):
            outside_legend(axis)
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
    drawn = {kind for _, shown in CURVE_METRICS for kind in shown}
    for task in tasks:
        if kinds[task] is None:
            out.notes.append(f"task {task}: neither auc nor rmse in results.json, so no curve is drawn for it")
        elif kinds[task] not in drawn:  # a kind registered beyond the built-in three
            out.notes.append(f"task {task}: the report draws no curve for a task of kind {kinds[task]}")
    out.png = png_bytes(figure)
    return out


def expert_names(config: Optional[Dict[str, Any]], num_experts: int) -> List[str]:
    """Column names of a gate's usage: PLE gates weigh the task's own experts first, then the shared ones."""
    own = dig(config, "model", "tower", "num_task_experts")
    if dig(config, "model", "tower", "kind") == "ple" and isinstance(own, int) and 0 < own < num_experts:
        return [f"own {i}" for i in range(own)] + [f"shared {i}" for i in range(num_experts - own)]
    return [f"expert {i}" for i in range(num_experts)]


def _gate_notes(results: Dict[str, Any], gated: Sequence[str]) -> List[str]:
    """Why a task has no gate: a product of other tasks' outputs (ctcvr) has none of its own."""
    products = dig(results, "config", "objective", "products", default={})
    notes = []
    for task in results["tasks"]:
        if task in gated:
            continue
        parts = dig(products, task, "of")
        reason = f"a product of {' × '.join(parts)}, it has no gate of its own" if parts else "no gate recorded"
        notes.append(f"task {task}: {reason}")
    return notes


def gate_usage_figure(results: Dict[str, Any]) -> FigureSection:
    """Heatmap of each task's mean gate weight per expert over the test rows."""
    out = FigureSection("gate_usage", "Gate usage per expert (test rows)")
    gates = dig(results, "diagnostics", "gates")
    tower = dig(results, "config", "model", "tower", "kind", default="unknown")
    tasks = [task for task in gates or {} if isinstance(dig(gates, task, "usage"), list) and gates[task]["usage"]]
    if not tasks:
        out.notes.append(f"no gates recorded (diagnostics.gates is empty): the {tower} tower has none to show")
        return out
    width = max(len(gates[task]["usage"]) for task in tasks)
    usage = np.full((len(tasks), width), np.nan)
    for row, task in enumerate(tasks):
        usage[row, : len(gates[task]["usage"])] = [number(v) for v in gates[task]["usage"]]
    figure, (axis,) = new_figure(1, width=max(4.5, 1.1 * width + 2.5), height=max(2.5, 0.6 * len(tasks) + 1.6))
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
    axis.set_yticks(range(len(tasks)), [f"{t} (H={number(gates[t].get('entropy')):.2f})" for t in tasks])
    axis.set_title(f"mean gate weight ({tower}; H = gate entropy in nats, uniform = {math.log(width):.2f})")
    figure.colorbar(image, ax=axis, label="share of the task's rows")
    out.notes.extend(_gate_notes(results, tasks))
    out.png = png_bytes(figure)
    return out


def gate_entropy_figure(results: Dict[str, Any]) -> FigureSection:
    """Each task's mean gate entropy over the training steps, against the entropy of a uniform gate."""
    out = FigureSection("gate_entropy", "Gate entropy during training")
    curve = [point for point in dig(results, "training", "curve", default=[]) if isinstance(point, dict)]
    tasks = list(dict.fromkeys(task for point in curve for task in (dig(point, "gates", default={}) or {})))
    if not tasks:
        out.notes.append("the training curve records no gates (a tower without gates, or an older run)")
        return out
    colors = task_colors(list(results["tasks"]) + [t for t in tasks if t not in results["tasks"]])
    steps = np.array([number(point.get("step")) for point in curve])
    figure, (axis,) = new_figure(1, width=6.5, height=3.8)
    width = 0
    for task in tasks:
        entropy = [number(dig(point, "gates", task, "entropy")) for point in curve]
        axis.plot(steps, entropy, marker="o", markersize=3, color=colors[task], label=task)
        width = max([width] + [len(dig(point, "gates", task, "usage", default=[])) for point in curve])
    if width > 1:
        axis.axhline(math.log(width), color="grey", linestyle=":", linewidth=1, label=f"uniform over {width}")
    axis.set(
        title="gate entropy (nats): lower = fewer experts per row", xlabel="step", ylabel="entropy", ylim=(0, None)
    )
    outside_legend(axis)
    out.notes.extend(_gate_notes(results, tasks))
    out.png = png_bytes(figure)
    return out
