"""The ESMM task set as a ready objective, for tests that exercise the objective and metrics on the default tasks."""

from __future__ import annotations

from typing import Dict, Optional

from torchrec_mtl.tasks import MultiTaskObjective, esmm_tasks

EVALUATED_TASKS = dict(esmm_tasks().names)


def EsmmObjective(
    weights: Optional[Dict[str, float]] = None,
    rating_offset: float = 0.0,
    min_propensity: float = 0.01,
    weighting: str = "static",
) -> MultiTaskObjective:
    """The ESMM task set as an objective. ``weights`` per term: ``ctr``, ``ctcvr``, ``cvr_ips`` (the IPS-weighted
    CVR term, default 0) and ``rating``."""
    allowed = ("ctr", "ctcvr", "cvr_ips", "rating")
    unknown = sorted(set(weights or {}) - set(allowed))
    if unknown:
        raise ValueError(f"weights: unknown loss term(s) {unknown}; allowed: {allowed}")
    task_set = esmm_tasks(**{"ctr": 1.0, "ctcvr": 1.0, "cvr_ips": 0.0, "rating": 1.0, **(weights or {})})
    return MultiTaskObjective(task_set, {"rating": rating_offset}, weighting, min_propensity)
