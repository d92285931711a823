"""Per-task metrics through torchrec's RecMetricModule, one RecTaskInfo per task.

Binary tasks get AUC, NE and calibration; regression tasks get MSE, RMSE and MAE; a retrieval task (its score a
cosine, not a probability) gets AUC alone. A task's rows are those whose label is
not NaN (see torchrec_mtl.tasks): the label becomes the RecMetric weight, so rows outside the task count nowhere.
Values are reduced across ranks by RecMetricModule itself.

Example::

    >>> kinds = {"ctr": "binary", "rating": "regression"}
    >>> metrics = TaskMetrics(kinds, batch_size=512, window_size=10**6, device=env.device)  # doctest: +SKIP
    >>> metrics.update({"ctr": p, "rating": r}, {"ctr": y, "rating": s})  # doctest: +SKIP
    >>> metrics.compute()["ctr"]["auc"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import (
    MetricsConfig,
    RecComputeMode,
    RecMetricDef,
    RecMetricEnum,
    RecTaskInfo,
)

from torchrec_mtl.task_kinds import KINDS


def _metrics_of(kind: str) -> Dict[RecMetricEnum, str]:
    """The torchrec metrics of a task kind (torchrec_mtl.task_kinds), each with the name it is reported under."""
    return {RecMetricEnum[name]: name.lower() for name in KINDS[kind].metrics}


class TaskMetrics:
    """Accumulates predictions per task and computes the metrics of each task's kind.

    Args:
        task_kinds: task name -> "binary", "regression" or "retrieval".
        batch_size: per-rank batch size.
        window_size: rows kept per window (global, over all ranks); make it at least the evaluation set's size for
            whole-set AUC.
        device: where the metric states live: the run's device, where the predictions arrive (a reduction over ranks
            gathers them there: NCCL only gathers GPU tensors). ``update`` takes predictions on any device.
        count_rows: also report each task's ``rows`` (labelled rows) and, for tasks with 0/1 labels, ``positives``,
            summed over ranks: what a metric was computed on (an AUC on a handful of positives means little).
    """

    def __init__(
        self,
        task_kinds: Dict[str, str],
        batch_size: int,
        window_size: int,
        device: torch.device,
        count_rows: bool = False,
    ) -> None:
        self.task_kinds = dict(task_kinds)
        # per task: [labelled rows, positive rows], kept as tensors so counting costs no host sync per batch
        self.counts = (
            {name: torch.zeros(2, dtype=torch.int64, device=device) for name in task_kinds} if count_rows else None
        )
        names = list(self.task_kinds)
        tasks = [
            RecTaskInfo(name=n, label_name=f"{n}-label", prediction_name=f"{n}-prediction", weight_name=f"{n}-weight")
            for n in names
        ]
        by_metric: Dict[RecMetricEnum, list] = {}
        for index, name in enumerate(names):
            for metric in _metrics_of(self.task_kinds[name]):
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
        self.device = device
        if world_size == 1:
            # one process has nothing to gather, and a gather would run on gloo's own thread: a tensor copy there
            # starts a second OpenMP team, after which every training step of the process ran about 1.7x slower
            # (the threads stop spinning between parallel regions)
            for metric in self.module.modules():
                if isinstance(metric, Metric):
                    metric.sync_on_compute = metric._to_sync = False

    def update(self, predictions: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor]) -> None:
        model_out = {}
        for name in self.task_kinds:
            label = labels[name].to(self.device)
            present = ~torch.isnan(label)
            model_out[f"{name}-prediction"] = predictions[name].to(self.device).double()
            model_out[f"{name}-label"] = torch.nan_to_num(label).double()
            model_out[f"{name}-weight"] = present.double()
            if self.counts is not None:
                self.counts[name] += torch.stack([present.sum(), (label == 1).sum()])
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
        if self.counts is not None:
            counts = torch.stack([self.counts[name] for name in self.task_kinds])
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(counts)
            for name, (rows, positives) in zip(self.task_kinds, counts.tolist()):
                result[name]["rows"] = rows
                if KINDS[self.task_kinds[name]].label_kind == "binary":
                    result[name]["positives"] = positives
        return result

    def reset(self) -> None:
        self.module.reset()
        for counts in (self.counts or {}).values():
            counts.zero_()


# Cells (groups x longest group) per GAUCMetric update: torchrec pads every group to the longest one in an update.
_GAUC_CELLS_PER_UPDATE = 1 << 22


def grouped_auc(
    predictions: Dict[str, torch.Tensor],
    labels: Dict[str, torch.Tensor],
    groups: torch.Tensor,
    device: Optional[torch.device] = None,
) -> Dict[str, float]:
    """GAUC per task: the AUC within each group (e.g. each user), averaged over the groups that have both labels and
    not all-equal predictions, computed by torchrec's GAUCMetric. Rows with a NaN label (outside the task's space,
    padding) and rows with a negative group (unknown user) are left out.

    Every rank passes its own rows; rows are exchanged so that each rank scores whole groups, and the metric's states
    are summed over ranks, so every rank returns the same values. The rows are grouped on the host (they are
    exchanged as pickled objects and ordered by group); the metric runs on ``device`` (default: the predictions'),
    the run's, where NCCL can sum its states.

    Example::

        >>> p, y = torch.tensor([0.9, 0.1, 0.2, 0.8]), torch.tensor([1.0, 0.0, 1.0, 0.0])
        >>> grouped_auc({"ctr": p}, {"ctr": y}, torch.tensor([7, 7, 8, 8]))  # user 7: AUC 1, user 8: AUC 0
        {'ctr': 0.5}
    """
    from torchrec.metrics.gauc import GAUCMetric

    names = list(predictions)
    device = device if device is not None else predictions[names[0]].device
    stacked = torch.stack([predictions[n].float() for n in names]).cpu()
    stacked_labels = torch.stack([labels[n].float() for n in names]).cpu()
    groups = groups.cpu().long()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (groups, stacked, stacked_labels))
        groups = torch.cat([g for g, _, _ in gathered])
        stacked = torch.cat([p for _, p, _ in gathered], dim=1)
        stacked_labels = torch.cat([y for _, _, y in gathered], dim=1)
    mine = (groups >= 0) & (groups % world_size == rank)
    groups, stacked, stacked_labels = groups[mine], stacked[:, mine], stacked_labels[:, mine]
    order = torch.argsort(groups, stable=True)
    groups, stacked, stacked_labels = groups[order], stacked[:, order], stacked_labels[:, order]
    weights = (~torch.isnan(stacked_labels)).float()
    stacked_labels = torch.nan_to_num(stacked_labels)

    tasks = [RecTaskInfo(name=n, label_name=f"{n}-label", prediction_name=f"{n}-prediction") for n in names]
    metric = GAUCMetric(
        world_size=world_size,
        my_rank=rank,
        batch_size=1,
        tasks=tasks,
        window_size=world_size,
        compute_mode=RecComputeMode.FUSED_TASKS_COMPUTATION,
        compute_on_all_ranks=True,
    ).to(device)
    stacked, stacked_labels, weights = stacked.to(device), stacked_labels.to(device), weights.to(device)
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # groups of similar length share an update (little padding), each update under _GAUC_CELLS_PER_UPDATE cells
    chunks: List[List[int]] = []
    longest = 0
    for group in torch.argsort(counts).tolist():
        size = int(counts[group])
        if chunks and (len(chunks[-1]) + 1) * max(longest, size) <= _GAUC_CELLS_PER_UPDATE:
            chunks[-1].append(group)
            longest = max(longest, size)
        else:
            chunks.append([group])
            longest = size
    for chunk in chunks:
        rows = torch.cat([torch.arange(int(starts[g]), int(starts[g] + counts[g])) for g in chunk]).to(device)
        metric.update(
            predictions=stacked[:, rows],
            labels=stacked_labels[:, rows],
            weights=weights[:, rows],
            num_candidates=counts[chunk].to(device),
        )
    values = metric.compute()
    return {n: float(values[f"gauc-{n}|lifetime_gauc"]) for n in names}
