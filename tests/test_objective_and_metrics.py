"""The ESMM objective's sample spaces and the per-task metrics: rows outside a task count nowhere."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mtl.data.batch import MultiTaskBatch
from esmm import EVALUATED_TASKS, EsmmObjective
from torchrec_mtl.train.metrics import TaskMetrics


def _batch(click, conversion, rating, row_weight=None) -> MultiTaskBatch:
    n = len(click)
    return MultiTaskBatch(
        dense_features=torch.zeros(n, 1),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            ["f"], torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.int32)
        ),
        labels={
            "click": torch.tensor(click, dtype=torch.float32),
            "conversion": torch.tensor(conversion, dtype=torch.float32),
            "rating": torch.tensor(rating, dtype=torch.float32),
        },
        row_weight=torch.ones(n) if row_weight is None else torch.tensor(row_weight, dtype=torch.float32),
    )


def _logits(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, generator=g, requires_grad=True) for name in ("ctr", "cvr", "rating")}


def test_labels_follow_each_task_sample_space():
    nan = float("nan")
    batch = _batch([1, 1, 0, 0], [1, 0, 0, 0], [4.0, 2.5, nan, nan])
    _, (_, predictions, labels) = EsmmObjective()(_logits(4), batch)
    assert labels["ctr"].tolist() == [1, 1, 0, 0]
    assert labels["ctcvr"].tolist() == [1, 0, 0, 0]
    cvr = labels["cvr"].tolist()
    assert cvr[:2] == [1, 0] and all(math.isnan(v) for v in cvr[2:]), "CVR is evaluated on clicked rows only"
    assert labels["rating"][:2].tolist() == [4.0, 2.5] and torch.isnan(labels["rating"][2:]).all()
    torch.testing.assert_close(predictions["ctcvr"], predictions["ctr"] * predictions["cvr"])


def test_masked_rows_contribute_nothing_to_the_loss_or_its_gradient():
    nan = float("nan")
    objective = EsmmObjective()
    logits = _logits(3)
    base, _ = objective(logits, _batch([1, 0, 1], [0, 0, 1], [3.0, nan, 5.0], [1, 1, 0]))
    # the third row is padding (weight 0): any labels there change nothing
    other, _ = objective(logits, _batch([1, 0, 0], [0, 0, 0], [3.0, nan, 1.0], [1, 1, 0]))
    assert torch.equal(base, other)
    base.backward()
    for name, tensor in logits.items():
        assert tensor.grad[2] == 0, f"padding row has a {name} gradient"
    # the rating head gets no gradient from the unrated row
    assert logits["rating"].grad[1] == 0 and logits["rating"].grad[0] != 0


def test_esmm_loss_matches_a_direct_computation():
    batch = _batch([1, 0, 1, 0], [1, 0, 0, 0], [4.0, float("nan"), 3.0, float("nan")])
    logits = _logits(4, seed=2)
    loss, _ = EsmmObjective(weights={"ctr": 1.0, "ctcvr": 2.0, "rating": 0.5}, rating_offset=3.0)(logits, batch)
    p_ctr, p_cvr = torch.sigmoid(logits["ctr"]), torch.sigmoid(logits["cvr"])
    click, ctcvr = batch.labels["click"], torch.tensor([1.0, 0, 0, 0])
    bce = torch.nn.functional.binary_cross_entropy
    rating = logits["rating"][[0, 2]] + 3.0
    expected = (
        bce(p_ctr, click) + 2.0 * bce(p_ctr * p_cvr, ctcvr) + 0.5 * ((rating - torch.tensor([4.0, 3.0])) ** 2).mean()
    )
    torch.testing.assert_close(loss, expected)


def test_metrics_count_only_rows_with_a_label():
    g = torch.Generator().manual_seed(0)
    n = 2000
    score = torch.rand(n, generator=g)
    label = (torch.rand(n, generator=g) < score).float()
    present = torch.rand(n, generator=g) < 0.5
    hidden_label = torch.where(present, label, torch.tensor(float("nan")))
    rating = torch.randn(n, generator=g) + 3
    error = torch.linspace(-1.0, 1.0, n) ** 3  # RMSE and MAE differ
    rating_label = torch.where(present, rating + error, torch.tensor(float("nan")))
    metrics = TaskMetrics(EVALUATED_TASKS, batch_size=500, window_size=n, device=torch.device("cpu"))
    for rows in torch.arange(n).split(500):
        metrics.update(
            {task: (rating if task == "rating" else score)[rows] for task in EVALUATED_TASKS},
            {task: (rating_label if task == "rating" else hidden_label)[rows] for task in EVALUATED_TASKS},
        )
    result = metrics.compute()
    expected_auc = float(binary_auroc(score[present], label[present].long()))
    assert result["ctr"]["auc"] == pytest.approx(expected_auc, abs=1e-6)
    assert result["rating"]["rmse"] == pytest.approx(float(error[present].pow(2).mean().sqrt()), abs=1e-6)
    assert result["rating"]["mae"] == pytest.approx(float(error[present].abs().mean()), abs=1e-6)
    assert 0 < result["ctr"]["ne"] < 1 and result["ctr"]["calibration"] == pytest.approx(
        float(score[present].sum() / label[present].sum()), rel=1e-6
    )


def test_cvr_ips_term_weights_clicked_rows_by_inverse_click_propensity():
    # Two clicked, non-converting rows with the same CVR logit; the one with the lower pCTR must pull 4x harder.
    batch = _batch([1, 1, 0], [0, 0, 0], [3.0, 3.0, float("nan")])
    logits = {
        "ctr": torch.log(torch.tensor([0.05 / 0.95, 0.2 / 0.8, 0.1 / 0.9])),
        "cvr": torch.zeros(3, requires_grad=True),
        "rating": torch.zeros(3),
    }
    only_ips = EsmmObjective(weights={"ctr": 0.0, "ctcvr": 0.0, "rating": 0.0, "cvr_ips": 1.0})
    loss, _ = only_ips(logits, batch)
    loss.backward()
    grad = logits["cvr"].grad
    assert grad[2] == 0, "an unclicked row has no CVR label"
    assert float(grad[0] / grad[1]) == pytest.approx(4.0, rel=1e-5)
    # self-normalised: the loss is the weighted mean BCE, here log(2) for a logit of 0
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)


def test_unknown_loss_term_is_refused():
    with pytest.raises(ValueError, match="cvr_direct"):
        EsmmObjective(weights={"cvr_direct": 1.0})


def test_a_product_label_is_zero_when_any_part_is_zero_and_unknown_when_undetermined():
    from torchrec_mtl.tasks import MultiTaskObjective, ProductSpec, TaskSet, TaskSpec

    nan = float("nan")
    tasks = TaskSet(
        tasks=(TaskSpec("ctr", "binary", "click"), TaskSpec("cvr", "binary", "conversion", 0.0, given="ctr")),
        products=(ProductSpec("ctcvr", ("ctr", "cvr")),),
    )
    # conversion is unknown (NaN) on unclicked rows here, as in logs that only record it after a click
    batch = _batch([1, 1, 0, 1], [1, 0, nan, nan], [nan] * 4)
    _, (_, _, labels) = MultiTaskObjective(tasks)(_logits(4), batch)
    ctcvr = labels["ctcvr"].tolist()
    assert ctcvr[:3] == [1.0, 0.0, 0.0] and math.isnan(ctcvr[3])
    assert labels["cvr"][:2].tolist() == [1.0, 0.0] and torch.isnan(labels["cvr"][2:]).all()


def test_order_constraint_penalises_only_violations_and_pushes_them_apart():
    from torchrec_mtl.tasks import MultiTaskObjective, OrderSpec, TaskSet, TaskSpec

    tasks = TaskSet(
        tasks=(TaskSpec("ctr", "binary", "click", 0.0), TaskSpec("ctcvr", "binary", "conversion", 0.0)),
        orders=(OrderSpec(lower="ctcvr", upper="ctr", weight=1.0),),
    )
    logits = {
        "ctr": torch.tensor([0.0, 2.0], requires_grad=True),
        "ctcvr": torch.tensor([1.0, -1.0], requires_grad=True),
    }
    loss, _ = MultiTaskObjective(tasks)(logits, _batch([1, 0], [0, 0], [3.0, 3.0]))
    expected = (torch.sigmoid(torch.tensor(1.0)) - 0.5) / 2  # row 0 violates, row 1 does not
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits["ctcvr"].grad[0] > 0 > logits["ctr"].grad[0], "descent lowers p_lower and raises p_upper"
    assert logits["ctcvr"].grad[1] == 0 and logits["ctr"].grad[1] == 0


def test_declared_tasks_refuse_broken_references():
    from torchrec_mtl.tasks import ProductSpec, TaskSet, TaskSpec

    with pytest.raises(ValueError, match=r"tasks.cvr.given: 'rating' is not a binary task"):
        TaskSet(tasks=(TaskSpec("rating", "regression", "rating"), TaskSpec("cvr", "binary", "c", given="rating")))
    with pytest.raises(ValueError, match=r"products.ctr: the name is already a task"):
        TaskSet(
            tasks=(TaskSpec("ctr", "binary", "click"), TaskSpec("b", "binary", "b")),
            products=(ProductSpec("ctr", ("ctr", "b")),),
        )
    with pytest.raises(ValueError, match=r"tasks.a.ips: needs a given task"):
        TaskSet(tasks=(TaskSpec("a", "binary", "click", ips=True),))


def test_grouped_auc_is_the_mean_of_per_user_aucs_over_users_with_both_labels():
    from sklearn.metrics import roc_auc_score

    from torchrec_mtl.train.metrics import grouped_auc

    generator = torch.Generator().manual_seed(0)
    n = 3000
    users = torch.randint(0, 60, (n,), generator=generator)
    p = torch.rand(n, generator=generator)
    y = (torch.rand(n, generator=generator) < p).float()
    y[users == 5] = 1.0  # one label only: left out
    y[torch.arange(n) % 7 == 0] = float("nan")  # outside the task: left out
    users[users == 9] = -1  # unknown user: left out
    expected = []
    for user in users.unique().tolist():
        rows = (users == user) & ~torch.isnan(y)
        if user >= 0 and 0 < y[rows].mean() < 1:
            expected.append(roc_auc_score(y[rows].numpy(), p[rows].numpy()))
    result = grouped_auc({"ctr": p, "cvr": 1 - p}, {"ctr": y, "cvr": y}, users)
    assert abs(result["ctr"] - sum(expected) / len(expected)) < 1e-6
    assert abs(result["cvr"] - (1 - result["ctr"])) < 1e-6, "reversed scores give the complementary AUC per user"

    import torchrec_mtl.train.metrics as metrics_module

    limit = metrics_module._GAUC_CELLS_PER_UPDATE
    metrics_module._GAUC_CELLS_PER_UPDATE = 200  # many small updates instead of one: the same sums
    try:
        chunked = grouped_auc({"ctr": p, "cvr": 1 - p}, {"ctr": y, "cvr": y}, users)
    finally:
        metrics_module._GAUC_CELLS_PER_UPDATE = limit
    assert abs(chunked["ctr"] - result["ctr"]) < 1e-6 and abs(chunked["cvr"] - result["cvr"]) < 1e-6


def test_metrics_of_one_process_gather_nothing_through_the_process_group(monkeypatch):
    """A gather in a one-process group runs a tensor copy on gloo's own thread, after which the process's training
    steps ran about 1.7x slower: one process computes its metrics without any collective, to the same values."""
    import torch.distributed as dist

    from torchrec_mtl.train.distributed import init_distributed

    init_distributed()
    assert dist.get_world_size() == 1
    calls = []
    for name in ("all_gather", "all_gather_object", "all_reduce", "all_gather_into_tensor"):
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    torch.manual_seed(0)
    score = torch.rand(4000)
    label = (torch.rand(4000) < score).float()
    metrics = TaskMetrics({"ctr": "binary"}, batch_size=1000, window_size=4000, device=torch.device("cpu"))
    for rows in torch.arange(4000).split(1000):
        metrics.update({"ctr": score[rows]}, {"ctr": label[rows]})
    auc = metrics.compute()["ctr"]["auc"]
    assert calls == []
    assert auc == pytest.approx(float(binary_auroc(score, label.long())), abs=1e-5)
