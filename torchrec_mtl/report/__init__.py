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
absent from a figure it belongs in. Each task's kind (binary, regression, retrieval) is the one ``results.json``
declares in ``task_kinds``; an older file has none, and then a task whose metrics hold ``auc`` counts as binary
(calibrated only if they hold ``calibration``: else it is taken for retrieval) and one that holds ``rmse`` as
regression.

The package's modules, each with one job: ``data`` (inputs, task kinds, statistics), ``canvas`` (what every figure
shares), ``panels`` (the figures drawn from predictions), ``figures`` (the figures drawn from results.json, and the
list of all), ``tables`` (metric tables and run summary as HTML), ``page`` (the page and ``write_report``).

Example::

    >>> path = write_report("runs/main")  # doctest: +SKIP
    >>> path
    PosixPath('runs/main/report.html')
"""

from torchrec_mtl.report.canvas import FigureSection
from torchrec_mtl.report.data import (
    ReportError,
    binned_means,
    calibrated_tasks,
    epoch_starts,
    load_predictions,
    load_results,
    roc_points,
    task_kinds,
)
from torchrec_mtl.report.figures import (
    FIGURES,
    draw_figures,
    expert_names,
    gate_entropy_figure,
    gate_usage_figure,
    training_curves_figure,
)
from torchrec_mtl.report.page import HTML_FIRST_LINE, render_html, write_report
from torchrec_mtl.report.panels import calibration_figure, regression_figure, roc_figure
from torchrec_mtl.report.tables import metrics_table, run_summary, segments_table

__all__ = [
    "FIGURES",
    "HTML_FIRST_LINE",
    "FigureSection",
    "ReportError",
    "binned_means",
    "calibrated_tasks",
    "calibration_figure",
    "draw_figures",
    "epoch_starts",
    "expert_names",
    "gate_entropy_figure",
    "gate_usage_figure",
    "load_predictions",
    "load_results",
    "metrics_table",
    "regression_figure",
    "render_html",
    "roc_figure",
    "roc_points",
    "run_summary",
    "segments_table",
    "task_kinds",
    "training_curves_figure",
    "write_report",
]
