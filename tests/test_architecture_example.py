"""The worked example of docs/architecture.md ("Extension points") runs as written: a new tower kind and a new task
kind, each one class plus its registration, build and train through the ordinary builder and objective."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.modules.towers import TOWERS
from torchrec_mtl.task_kinds import KINDS
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture
def example():
    """The namespace the example's code block leaves, with the registries restored afterwards."""
    section = DOC.read_text().split("## Extension points", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    towers, kinds = dict(TOWERS), dict(KINDS)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 (our own documentation's example)
    yield namespace
    TOWERS.clear(), TOWERS.update(towers)
    KINDS.clear(), KINDS.update(kinds)


def test_the_documented_tower_and_task_kind_train_with_the_ordinary_objective(example):
    tower, objective = example["tower"], example["objective"]
    assert type(tower).__name__ == "WideBottom" and KINDS["count"].headline == "mae"
    torch.manual_seed(0)
    rows = 64
    features = torch.randn(rows, 12)
    visits = torch.poisson(torch.exp(features[:, 0].clamp(max=2)))
    batch = MultiTaskBatch(
        dense_features=features,
        sparse_features=KeyedJaggedTensor.from_lengths_sync(["x"], torch.zeros(rows, dtype=torch.long),
                                                            torch.ones(rows, dtype=torch.int32)),  # fmt: skip
        labels={"click": (features[:, 1] > 0).float(), "visits": visits},
        row_weight=torch.ones(rows),
    )
    optimizer = torch.optim.Adam(tower.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss, (_, predictions, _) = objective(tower(features), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert torch.all(predictions["visits"] > 0), "a count is predicted as a rate"
    assert set(predictions) == {"ctr", "visits"}


def test_an_unknown_tower_kind_is_refused_with_the_known_ones():
    from torchrec_mtl.build import build_tower
    from torchrec_mtl.config import TowerConfig

    with pytest.raises(ValueError, match="allowed: mmoe, ple, shared_bottom, single_task"):
        build_tower(TowerConfig(kind="wide_bottom"), 8, ["ctr"])
