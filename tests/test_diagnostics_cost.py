"""What the training diagnostics cost and leave behind: the gradient cosine is measured on its sampled steps only
(through the training loop, which tells it the run's length), a sampled step keeps no graph and changes no gradient,
and a curve point updates the metrics once. An unsharded model under a stand-in for the training pipeline keeps these
in the unit tier; tools/bench_diagnostics.py measures the time."""

from __future__ import annotations

import gc
import weakref
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from torchrec_mtl.build import build_model
from torchrec_mtl.config import ModelConfig, ObjectiveConfig
from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.model import MultiTaskTrain
from torchrec_mtl.tasks import MultiTaskObjective, esmm_tasks
from torchrec_mtl.train.diagnostics import TaskGradientCosine
from torchrec_mtl.train.loop import CurveWindow, train
from torchrec_mtl.train.metrics import TaskMetrics

TABLES = {f"C{i}": 20 for i in range(1, 5)}
PAIRS = {"ctr|cvr", "ctr|rating", "ctr|ctcvr", "cvr|rating", "cvr|ctcvr", "rating|ctcvr"}


def _log(rows: int) -> EncodedLog:
    rng = np.random.default_rng(0)
    click = (rng.random(rows) < 0.3).astype(np.float32)
    return EncodedLog(
        dense=rng.random((rows, 13)).astype(np.float32),
        sparse=rng.integers(1, 20, (rows, len(TABLES))).astype(np.int64),
        labels={
            "click": click,
            "conversion": (click * (rng.random(rows) < 0.4)).astype(np.float32),
            "rating": rng.integers(1, 6, rows).astype(np.float32),
        },
    )


class _StepPipeline:
    """Stands in for TrainPipelineSparseDist in ``train``: one forward, backward and optimizer step per batch. It
    keeps the last step's loss, graph and all, to show that the step's backward freed the graph."""

    def __init__(self, model: MultiTaskTrain) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        self.last_loss: torch.Tensor | None = None

    def progress(self, batches: Iterator[MultiTaskBatch]) -> Tuple:
        batch = next(batches)  # StopIteration ends the pass, as the pipeline's does
        self.optimizer.zero_grad(set_to_none=True)
        loss, output = self.model(batch)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss
        return output

    def reset(self) -> None:
        pass


def _trainer(
    cosine_every: int, rows: int = 320, batch_size: int = 32
) -> Tuple[MultiTaskTrain, _StepPipeline, BatchLoader]:
    """A small MMoE with the ESMM objective (the same weights every call), its stand-in pipeline, and a loader of
    ``rows // batch_size`` batches an epoch."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 13, TABLES, torch.device("cpu"), task_names=esmm_tasks().tower_tasks)
    objective = MultiTaskObjective(esmm_tasks(), {"rating": 3.0}, gradient_cosine_every=cosine_every)
    trained = MultiTaskTrain(model, objective)
    return trained, _StepPipeline(trained), BatchLoader(_log(rows), list(TABLES), batch_size, seed=0)


def test_the_loop_samples_the_cosine_in_the_middle_of_each_span_of_every_steps():
    model, pipeline, loader = _trainer(cosine_every=4)  # 10 batches an epoch
    summary = train(model, pipeline, loader, epochs=2, show_progress=False)
    cosine = model.objective.gradient_cosine
    assert summary.steps == 20 and cosine.calls == 20
    assert cosine.sampled_steps == [2, 6, 10, 14, 18]
    assert set(cosine.summary()) == PAIRS and all(-1.0 <= value <= 1.0 for value in cosine.summary().values())


def test_a_run_shorter_than_the_default_span_is_sampled_once_in_its_middle():
    assert ObjectiveConfig().gradient_cosine_every == 500
    model, pipeline, loader = _trainer(cosine_every=ObjectiveConfig().gradient_cosine_every)
    train(model, pipeline, loader, epochs=2, show_progress=False)  # 20 steps, planned by the loop
    assert model.objective.gradient_cosine.sampled_steps == [10]


def test_the_cosine_is_the_mean_over_the_sampled_steps_and_a_resume_keeps_the_step_numbers():
    shared = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

    def observe_steps(monitor: TaskGradientCosine, steps: List[int]) -> List[float]:
        """Observe each step's terms (their cosine differs from step to step); the cosines of the sampled ones."""
        cosines = []
        for step in steps:
            direction = torch.tensor([1.0, float(step), -1.0])
            monitor.observe({"a": (shared * direction).sum(), "b": shared.sum()})
            if monitor.sampled_steps and monitor.sampled_steps[-1] == step:
                cosines.append(float(nn.functional.cosine_similarity(direction, torch.ones(3), dim=0)))
        return cosines

    monitor = TaskGradientCosine(every=3)
    monitor.attach([shared])
    monitor.plan_steps(total_steps=8)
    cosines = observe_steps(monitor, list(range(1, 9)))
    assert monitor.sampled_steps == [2, 5, 8] and len(set(cosines)) == 3
    assert monitor.summary() == {"a|b": pytest.approx(sum(cosines) / 3, abs=1e-6)}
    resumed = TaskGradientCosine(every=3)
    resumed.attach([shared])
    resumed.plan_steps(total_steps=8, steps_done=4)  # steps 5 to 8 after a resume: the same sampled steps
    assert observe_steps(resumed, [5, 6, 7, 8]) == cosines[1:] and resumed.sampled_steps == [5, 8]
    unplanned = TaskGradientCosine(every=3)  # not told the run's length: the middle of each span from step 1
    assert [step for step in range(1, 9) if unplanned.is_sampled(step)] == [2, 5, 8]
    with pytest.raises(ValueError, match="every: 0"):
        TaskGradientCosine(every=0)


def test_a_sampled_step_keeps_nothing_of_its_graph_and_trains_the_weights_as_without_the_sample(monkeypatch):
    sampled_model, sampled_pipeline, loader = _trainer(cosine_every=1)  # every step sampled
    plain_model, plain_pipeline, _ = _trainer(cosine_every=0)
    terms: List[weakref.ref] = []
    observe = TaskGradientCosine.observe
    monkeypatch.setattr(TaskGradientCosine, "observe", lambda self, step_terms: (
        terms.extend(weakref.ref(term) for term in step_terms.values()), observe(self, step_terms)))  # fmt: skip
    after_each_step: List[Tuple[bool, bool]] = []

    def check(summary, window) -> bool:
        """No loss term outlives its step (the monitor keeps none), and the step's backward freed the graph that the
        cosine's extra passes kept (retain_graph): a second backward through it fails."""
        gc.collect()
        terms_gone = bool(terms) and all(term() is None for term in terms)
        terms.clear()
        try:
            sampled_pipeline.last_loss.backward()
            graph_freed = False
        except RuntimeError as error:
            graph_freed = "second time" in str(error)
        sampled_pipeline.optimizer.zero_grad(set_to_none=True)
        after_each_step.append((terms_gone, graph_freed))
        return False

    train(sampled_model, sampled_pipeline, loader, epochs=1, show_progress=False, after_step=check)
    train(plain_model, plain_pipeline, loader, epochs=1, show_progress=False)
    assert sampled_model.objective.gradient_cosine.samples == 10 and after_each_step == [(True, True)] * 10
    # the extra gradients never reached .grad: every step's update, and so every weight, is the plain run's
    for (name, value), plain in zip(sampled_model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        assert torch.equal(value, plain), name


def test_a_curve_point_updates_the_metrics_once_with_the_same_values_as_batch_by_batch(monkeypatch):
    kinds = {"ctr": "binary", "rating": "regression"}
    generator = torch.Generator().manual_seed(0)
    batches: List[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = []
    for _ in range(5):
        labels = {"ctr": (torch.rand(16, generator=generator) < 0.3).float(), "rating": torch.rand(16) * 4 + 1}
        labels["ctr"][:3] = float("nan")  # rows outside the task
        batches.append(({"ctr": torch.rand(16, generator=generator), "rating": torch.rand(16) * 4 + 1}, labels))
    reference = TaskMetrics(kinds, 16, 5 * 16, torch.device("cpu"), count_rows=True)
    for predictions, labels in batches:
        reference.update(predictions, labels)
    expected = reference.compute()
    window = CurveWindow(kinds, 16, 5, 1, torch.device("cpu"))
    for predictions, labels in batches:
        window.add(predictions, labels)
    updates = []
    original = TaskMetrics.update
    monkeypatch.setattr(TaskMetrics, "update", lambda self, *args: updates.append(1) or original(self, *args))
    result = window.compute()
    assert len(updates) == 1 and window.batches == []
    assert result.keys() == expected.keys()
    for task, values in expected.items():
        assert result[task] == pytest.approx(values, rel=1e-12), task
