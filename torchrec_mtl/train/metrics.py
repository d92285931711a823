"""Per-task metrics through torchrec's RecMetricModule, one RecTaskInfo per task.

Binary tasks get AUC, NE and calibration; regression tasks get MSE, RMSE and MAE. A task's rows are those whose label is
not NaN (see torchrec_mtl.tasks): the label becomes the RecMetric weight, so rows outside the task count nowhere.
Values are reduced across ranks by RecMetricModule itself.

Example::

    >>> metrics = TaskMetrics({"ctr": "binary", "rating": "regression"}, batch_size=512, window_size=10**6)
    >>> metrics.update({"ctr": p, "rating": r}, {"ctr": y, "rating": s})  # doctest: +SKIP
    >>> metrics.compute()["ctr"]["auc"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import (
    MetricsConfig,
    RecComputeMode,
    RecMetricDef,
    RecMetricEnum,
    RecTaskInfo,
)

_BINARY = {RecMetricEnum.AUC: "auc", RecMetricEnum.NE: "ne", RecMetricEnum.CALIBRATION: "calibration"}
_REGRESSION = {RecMetricEnum.MSE: "mse", RecMetricEnum.MAE: "mae"}


class TaskMetrics:
    """Accumulates predictions per task and computes the metrics of each task's kind.

    Args:
        task_kinds: task name -> "binary" or "regression".
        batch_size: per-rank batch size.
        window_size: rows kept per window (global, over all ranks); make it at least the evaluation set's size for
            whole-set AUC.
        device: where the metric states live.
    """

    def __init__(
        self,
        task_kinds: Dict[str, str],
        batch_size: int,
        window_size: int,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.task_kinds = dict(task_kinds)
        names = list(self.task_kinds)
        tasks = [
            RecTaskInfo(name=n, label_name=f"{n}-label", prediction_name=f"{n}-prediction", weight_name=f"{n}-weight")
            for n in names
        ]
        by_metric: Dict[RecMetricEnum, list] = {}
        for index, name in enumerate(names):
            for metric in _BINARY if self.task_kinds[name] == "binary" else _REGRESSION:
                by_metric.setdefault(metric, []).append(index)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        window_size = max(window_size, 2 * batch_size * world_size)
        config = MetricsConfig(
            rec_tasks=tasks,
            rec_metrics={m: RecMetricDef(rec_task_indices=i, window_size=window_size) for m, i in by_metric.items()},
            rec_compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
            throughput_metric=None,
            state_metrics=[],
            compute_on_all_ranks=True,  # every rank returns the same reduced values
        )
        self.module = generate_metric_module(
            RecMetricModule,
            config,
            batch_size=batch_size,
            world_size=world_size,
            my_rank=dist.get_rank() if dist.is_initialized() else 0,
            state_metrics_mapping={},
            device=device,
        )

    def update(self, predictions: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor]) -> None:
        model_out = {}
        for name in self.task_kinds:
            present = ~torch.isnan(labels[name])
            model_out[f"{name}-prediction"] = predictions[name].double()
            model_out[f"{name}-label"] = torch.nan_to_num(labels[name]).double()
            model_out[f"{name}-weight"] = present.double()
        self.module.update(model_out)

    def compute(self) -> Dict[str, Dict[str, float]]:
        """task -> metric -> value; RMSE is reported beside MSE (and MAE) for regression tasks."""
        raw = self.module.compute()
        result: Dict[str, Dict[str, float]] = {name: {} for name in self.task_kinds}
        for key, value in raw.items():
            # Keys look like "auc-ctr|window_auc" or "mse-rating|window_rmse".
            metric_and_task, _, variant = key.partition("|")
            metric, _, task = metric_and_task.partition("-")
            if task in result and variant.startswith("window_"):
                result[task][variant.removeprefix("window_")] = float(value)
        return result

    def reset(self) -> None:
        self.module.reset()
