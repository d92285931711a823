"""The figures drawn from ``predictions.npz``, one panel per task: ROC curves and calibration for binary tasks,
predicted against actual for regression tasks. A task the file lacks, or has no labelled row of, gets a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np

from torchrec_mtl.report.canvas import FigureSection, log_ticks, new_figure, png_bytes
from torchrec_mtl.report.data import Predictions, binned_means, roc_points

# A ROC curve over 600k rows has as many points; this many draw the same line.
ROC_POINTS = 2000

# draw(axis, task, prediction, label) -> a note on what the panel leaves out, or None
Draw = Callable[[Any, str, np.ndarray, np.ndarray], Optional[str]]


def _prediction_panels(
    name: str,
    title: str,
    tasks: List[str],
    predictions: Optional[Predictions],
    source: Path,
    draw: Draw,
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
    figure, axes = new_figure(len(drawable), width=4.2, height=4.0)
    for axis, task in zip(axes, drawable):
        note = draw(axis, task, *predictions[task])
        if note:
            out.notes.append(f"task {task}: {note}")
    out.png = png_bytes(figure)
    return out


def _draw_roc(axis: Any, task: str, prediction: np.ndarray, label: np.ndarray) -> Optional[str]:
    """The ROC curve, thinned to ROC_POINTS points, against chance; a note when one class only leaves none."""
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


def _draw_calibration(axis: Any, task: str, prediction: np.ndarray, label: np.ndarray) -> Optional[str]:
    """Observed rate against mean prediction per bin, with binomial error bars; log axes for rare events."""
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
        log_ticks(axis, low, high)
    axis.legend(loc="upper left", fontsize="small")
    return note


def _draw_regression(axis: Any, task: str, prediction: np.ndarray, label: np.ndarray) -> Optional[str]:
    """Mean actual against mean predicted value per equal-count bin, against the diagonal."""
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


def roc_figure(tasks: List[str], predictions: Optional[Predictions], source: Path) -> FigureSection:
    """One ROC curve per task of ``tasks`` (binary or retrieval: any task with an AUC), its area in the legend."""
    return _prediction_panels("roc", "ROC curves (binary tasks)", tasks, predictions, source, _draw_roc)


def calibration_figure(tasks: List[str], predictions: Optional[Predictions], source: Path) -> FigureSection:
    """Per task, the observed positive rate against the mean predicted probability in equal-count bins."""
    return _prediction_panels(
        "calibration", "Calibration (binary tasks)", tasks, predictions, source, _draw_calibration
    )


def regression_figure(tasks: List[str], predictions: Optional[Predictions], source: Path) -> FigureSection:
    """Per task, the mean actual against the mean predicted value in equal-count bins."""
    return _prediction_panels(
        "regression", "Predicted against actual (regression tasks)", tasks, predictions, source, _draw_regression
    )
