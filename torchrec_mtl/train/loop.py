"""Training and evaluation through TorchRec's TrainPipelineSparseDist.

One pipeline serves both: in train mode it runs forward, backward and the optimizer step, overlapping the next
batch's input distribution; in eval mode (``model.eval()``) it runs forward only, as torchrec's DLRM example does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.train.diagnostics import GateMonitor
from torchrec_mtl.train.metrics import TaskMetrics, grouped_auc


@dataclass
class TrainSummary:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    losses: List[float] = field(default_factory=list)  # mean loss of each epoch, this rank
    # every ``curve_every`` steps: the step, the mean loss since the last point, and each task's windowed metrics
    curve: List[Dict] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def make_pipeline(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainPipelineSparseDist:
    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)


def _drain(pipeline: TrainPipelineSparseDist, loader: BatchLoader, description: str, show_progress: bool):
    """Yield ``(loss, predictions, labels)`` for each batch of ``loader``, then reset the pipeline for the next pass."""
    iterator = iter(loader)
    with tqdm(total=len(loader), desc=description, disable=not show_progress, unit="batch", leave=False) as bar:
        while True:
            try:
                output = pipeline.progress(iterator)
            except StopIteration:
                break
            bar.update(1)
            yield output
    pipeline.reset()


def train(
    model: nn.Module,
    pipeline: TrainPipelineSparseDist,
    loader: BatchLoader,
    epochs: int,
    show_progress: bool = True,
    task_kinds: Optional[Dict[str, str]] = None,
    curve_every: int = 0,
    window_batches: int = 100,
    gated_tower: Optional[nn.Module] = None,
) -> TrainSummary:
    """Run ``epochs`` passes over ``loader`` with ``pipeline`` (built over ``model``); every rank's loader must
    have the same length. With ``task_kinds`` and ``curve_every`` > 0, each task's metrics over the last
    ``window_batches`` batches (all ranks) are recorded every ``curve_every`` steps (every rank computes them at
    the same steps, as the reduction needs); with ``gated_tower`` (MMoE, PLE) each point also holds its gates'
    entropy and expert usage per task over those batches (this rank's rows, ``GateMonitor``)."""
    summary = TrainSummary()
    window = None
    monitor: Optional[GateMonitor] = None
    if task_kinds and curve_every > 0:
        window = TaskMetrics(
            task_kinds, batch_size=loader.batch_size, window_size=window_batches * loader.batch_size * loader.world_size
        )
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        total, count = torch.zeros(()), 0
        since, since_count = torch.zeros(()), 0
        for loss, predictions, labels in _drain(pipeline, loader, f"train epoch {epoch + 1}/{epochs}", show_progress):
            loss = loss.detach().cpu()
            total += loss
            since += loss
            count += 1
            since_count += 1
            summary.steps += 1
            # only the batches that the next point's window holds are fed to the metrics (they cost ~10% a step)
            if window is not None and -summary.steps % curve_every < window_batches:
                window.update(predictions, labels)
                if summary.steps % curve_every == 0:
                    point = {"step": summary.steps, "epoch": epoch + 1, "loss": float(since / since_count)}
                    if monitor is not None:
                        point["gates"] = monitor.summary()
                        monitor.__exit__()
                        monitor = None
                    summary.curve.append({**point, **window.compute()})
                    since, since_count = torch.zeros(()), 0
            # watch the gates over the batches the next point's window holds
            if window is not None and gated_tower is not None and monitor is None:
                if -(summary.steps + 1) % curve_every < window_batches:
                    monitor = GateMonitor(gated_tower).__enter__()
        summary.samples += count * loader.batch_size * loader.world_size
        summary.losses.append(float(total / max(count, 1)))
    if monitor is not None:
        monitor.__exit__()
    summary.seconds = time.perf_counter() - start
    return summary


@torch.no_grad()
def evaluate(
    model: nn.Module,
    pipeline: TrainPipelineSparseDist,
    loader: BatchLoader,
    task_kinds: Dict[str, str],
    show_progress: bool = True,
    groups: Optional[np.ndarray] = None,
) -> Dict[str, Dict[str, float]]:
    """Whole-set metrics per task over every row of ``loader`` (which should pad its tail), reduced over ranks.

    With ``groups`` (one integer per row of the loader's shards, e.g. the user; negative = unknown), binary tasks
    also get ``gauc``: the AUC within each group, averaged over groups (``grouped_auc``).
    """
    metrics = TaskMetrics(
        task_kinds, batch_size=loader.batch_size, window_size=len(loader) * loader.batch_size * loader.world_size
    )
    binary = [name for name, kind in task_kinds.items() if kind == "binary"]
    kept: Dict[str, List[torch.Tensor]] = {f"{n}{part}": [] for n in binary for part in ("-p", "-y")}
    model.eval()
    for _, predictions, labels in _drain(pipeline, loader, "evaluate", show_progress):
        metrics.update(predictions, labels)
        if groups is not None:
            for name in binary:
                kept[f"{name}-p"].append(predictions[name].detach().cpu())
                kept[f"{name}-y"].append(labels[name].detach().cpu())
    model.train()
    result = metrics.compute()
    if groups is not None and binary:
        rows = loader.row_order()
        row_groups = torch.from_numpy(np.where(rows >= 0, groups[np.maximum(rows, 0)], -1))
        gauc = grouped_auc(
            {n: torch.cat(kept[f"{n}-p"]) for n in binary}, {n: torch.cat(kept[f"{n}-y"]) for n in binary}, row_groups
        )
        for name, value in gauc.items():
            result[name]["gauc"] = value
    return result
