"""Which metric a task is judged by: its kind's headline (torchrec_mtl.task_kinds) when the kind is known, else read
from the metrics it has (results written before they carried kinds): AUC for binary tasks, RMSE for regression.
Shared by the printed tables, the curve lines, the report and the comparison tools; no heavy imports, so the report
can use it without torch.

Example::

    >>> headline({"auc": 0.76, "ne": 0.88}), task_kind({"rmse": 0.58, "mae": 0.47})
    ('auc', 'regression')
"""

from __future__ import annotations

from typing import Dict, Optional

from torchrec_mtl.task_kinds import KINDS


def task_kind(metrics: Dict[str, float]) -> Optional[str]:
    """``binary`` (it has an AUC), ``regression`` (an RMSE), or None (not a task's metrics)."""
    if "auc" in metrics:
        return "binary"
    if "rmse" in metrics:
        return "regression"
    return None


def headline(metrics: Dict[str, float], kind: Optional[str] = None) -> str:
    """The metric a task of ``kind`` (default: guessed by ``task_kind``) is judged by; for a kind not known here,
    its first metric."""
    kind = kind or task_kind(metrics)
    return KINDS[kind].headline if kind in KINDS else next(iter(metrics), "")
