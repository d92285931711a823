"""Which metric a task is judged by, read from the metrics it has: AUC for binary tasks (higher is better), RMSE for
regression tasks (lower is better). Shared by the printed tables, the curve lines, the report and the comparison
tools; no heavy imports, so the report can use it without torch.

Example::

    >>> headline({"auc": 0.76, "ne": 0.88}), task_kind({"rmse": 0.58, "mae": 0.47})
    ('auc', 'regression')
"""

from __future__ import annotations

from typing import Dict, Optional


def task_kind(metrics: Dict[str, float]) -> Optional[str]:
    """``binary`` (it has an AUC), ``regression`` (an RMSE), or None (not a task's metrics)."""
    if "auc" in metrics:
        return "binary"
    if "rmse" in metrics:
        return "regression"
    return None


def headline(metrics: Dict[str, float]) -> str:
    """The metric a task is judged by: AUC, RMSE, or (for a kind not known here) its first metric."""
    kind = task_kind(metrics)
    return {"binary": "auc", "regression": "rmse"}.get(kind or "", next(iter(metrics), ""))
