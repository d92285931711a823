"""Ensembles of checkpoints through evaluate and predict: members of one schema, tasks and data, each task's
predictions averaged (probabilities for binary tasks), each member's metrics beside the ensemble's; an ensemble of
one checkpoint is that checkpoint to the last bit; a member of other tasks, schema or data is refused, named, before
anything is scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from torchrec_mtl.cli import main
from torchrec_mtl.cli_args import build_parser
from torchrec_mtl.config import load_config
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.ensemble import check_members, mean_predictions
from torchrec_mtl.errors import EnsembleError
from torchrec_mtl.results import format_ensemble_table

CONFIG = "configs/mmoe_synthetic.yaml"
TASKS = ["ctr", "cvr", "rating", "ctcvr"]
KINDS = {"ctr": "binary", "cvr": "binary", "rating": "regression", "ctcvr": "binary"}


# --- unit tier: the members' check, the mean, the table, the command line -------------------------------------------


def _config(*overrides: str):
    return load_config(CONFIG, ["data.generate=null", *overrides])


def test_members_of_another_schema_tasks_or_data_are_refused_naming_them(tmp_path):
    schema = Path("configs/datasets/synthetic.yaml").read_text()
    (tmp_path / "same.yaml").write_text(schema)  # the same rules in another file: the same schema
    (tmp_path / "other.yaml").write_text(schema.replace("min_count: 2", "min_count: 3"))
    first = ("runs/a/checkpoints", _config())
    check_members([first, ("b", _config(f"data.schema={tmp_path / 'same.yaml'}", "model.tower.num_experts=2"))], True)
    refused = {
        "dataset schema": _config(f"data.schema={tmp_path / 'other.yaml'}"),
        "tasks": _config("objective.products={}"),
        "data": _config(f"data.dir={tmp_path}"),
        "evaluation.threshold": _config("evaluation.threshold=0.3"),
    }
    for what, config in refused.items():
        with pytest.raises(EnsembleError) as error:
            check_members([first, ("runs/b/checkpoints", config)], evaluation=True)
        message = str(error.value)
        assert message.startswith(f"--checkpoint runs/b/checkpoints: other {what} than the first member's "
                                  "(runs/a/checkpoints)") and "\n" not in message, message  # fmt: skip
    # predict has no threshold; with best_f1, evaluate needs the same validation rows (drawn with the seed)
    check_members([first, ("b", refused["evaluation.threshold"])], evaluation=False)
    best_f1 = ["evaluation.threshold=best_f1", "data.validation_fraction=0.1"]
    check_members([("a", _config(*best_f1)), ("b", _config(*best_f1))], evaluation=True)
    with pytest.raises(EnsembleError, match=r"^--checkpoint b: other validation rows .*'training.seed': 1"):
        check_members([("a", _config(*best_f1)), ("b", _config(*best_f1, "training.seed=1"))], evaluation=True)


def test_the_mean_of_one_member_is_its_values_and_a_nan_stays_nan():
    scores = np.random.default_rng(0).random(1000, dtype=np.float32)
    alone = mean_predictions([{"ctr": scores}])["ctr"]
    assert alone.dtype == np.float64 and np.array_equal(alone.astype(np.float32), scores)
    assert np.array_equal(mean_predictions([{"ctr": scores}, {"ctr": scores}])["ctr"], alone)
    pair = mean_predictions([{"ctr": np.array([0.2, 0.4, np.nan])}, {"ctr": np.array([0.6, np.nan, 0.1])}])["ctr"]
    np.testing.assert_allclose(pair[0], 0.4)
    assert np.isnan(pair[1:]).all()  # a row one member cannot score stays invalid


def test_the_ensemble_table_puts_each_members_headline_metric_beside_the_ensembles():
    member = {"ctr": {"auc": 0.7, "ne": 0.9}, "rating": {"rmse": 1.0}}
    table = format_ensemble_table(["a (step 1)", "b (step 2)"], [member, member], {"ctr": {"auc": 0.75, "ne": 0.8},
                                                                              "rating": {"rmse": 0.95}})  # fmt: skip
    assert table.splitlines() == [
        "member 1: a (step 1)",
        "member 2: b (step 2)",
        "task    metric    member 1  member 2  ensemble",
        "ctr     auc         0.7000    0.7000    0.7500",
        "rating  rmse        1.0000    1.0000    0.9500",
    ]


def test_checkpoint_repeats_for_an_ensemble_and_alone_reads_as_before(capsys):
    parser = build_parser()
    alone = parser.parse_args(["evaluate", "--checkpoint", "a", "training.progress=false"])
    assert alone.checkpoint == ["a"] and alone.overrides == ["training.progress=false"]
    assert parser.parse_args(["evaluate", "--config", CONFIG]).checkpoint is None
    both = parser.parse_args(["predict", "--checkpoint", "a", "--checkpoint", "b", "--input", "x.tsv"])
    assert both.checkpoint == ["a", "b"]
    # members are evaluated with the configs they recorded: one --config for all of them is refused
    assert main(["evaluate", "--config", CONFIG, "--checkpoint", "a", "--checkpoint", "b"]) == 2
    assert "--config takes one --checkpoint" in capsys.readouterr().err


# --- e2e tier (tests/conftest.py E2E_TESTS): one tiny run with three checkpoints, and one of other tasks ---------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MMoE (no item text) trained 9 steps on a 3,000-row log, checkpointed at steps 4, 8 and 9; and the same
    without the CTCVR product (other tasks)."""
    data = tmp_path_factory.mktemp("ensemble_log")
    generate(SyntheticConfig(num_rows=3000, num_users=100, num_items=60, num_brands=20, num_sessions=200, seed=5), data)
    common = ["--config", CONFIG, f"data.dir={data}", "data.generate=null", *ONE_PASS, "model.text=null",
              "training.batch_size=256", "training.progress=false"]  # fmt: skip
    out, other = tmp_path_factory.mktemp("ensemble_run"), tmp_path_factory.mktemp("ensemble_other_tasks")
    assert main(["train", *common, f"out_dir={out}", "checkpoint.every_steps=4", "checkpoint.keep=3"]) == 0
    assert main(["train", *common, f"out_dir={other}", "objective.products={}"]) == 0
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in steps] == ["step-000000004", "step-000000008", "step-000000009"]
    return data, out, steps, other / "checkpoints"


def _predict(checkpoints, log: Path, out: Path) -> np.ndarray:
    arguments = [argument for checkpoint in checkpoints for argument in ("--checkpoint", str(checkpoint))]
    assert main(["predict", *arguments, "--input", str(log), "--out", str(out), "--quiet"]) == 0
    header, *rows = out.read_text().splitlines()
    assert header.split("\t") == ["line", *TASKS]
    return np.array([[float(v) for v in row.split("\t")] for row in rows])


def _evaluate(checkpoints, out: Path, *overrides: str) -> dict:
    arguments = [argument for checkpoint in checkpoints for argument in ("--checkpoint", str(checkpoint))]
    assert main(["evaluate", *arguments, "training.progress=false", f"out_dir={out}", *overrides]) == 0
    return json.loads((out / "evaluation.json").read_text())


def test_an_ensemble_of_one_checkpoint_is_that_checkpoint_exactly(runs, tmp_path):
    from torchrec_mtl.run import evaluate_ensemble
    from torchrec_mtl.train.checkpoint import read_train_state

    data, _, steps, _ = runs
    checkpoint = steps[1]
    single = _evaluate([checkpoint], tmp_path / "single")
    assert "members" not in single and single["checkpoint"] == str(checkpoint)  # one --checkpoint: as before
    # the ensemble's machinery with one member: its mean, its metrics replayed in the same batches
    config = load_config(overrides=["training.progress=false", f"out_dir={tmp_path / 'one'}"],
                         raw=read_train_state(checkpoint)["config"])  # fmt: skip
    one = evaluate_ensemble([config], [str(checkpoint)])
    assert one["tasks"] == single["tasks"] and one["members"][0]["tasks"] == single["tasks"]
    # the same checkpoint twice: a mean of equal numbers is each of them
    twice = _evaluate([checkpoint, checkpoint], tmp_path / "twice")
    assert twice["tasks"] == single["tasks"]
    assert [m["checkpoint"] for m in twice["members"]] == [str(checkpoint)] * 2
    # best-F1 thresholds: chosen on the averaged validation scores, here the checkpoint's own
    best_f1 = ["evaluation.threshold=best_f1", "data.validation_fraction=0.2"]
    single = _evaluate([checkpoint], tmp_path / "single_best_f1", *best_f1)
    assert single["tasks"]["ctr"]["threshold"] != 0.5
    assert _evaluate([checkpoint, checkpoint], tmp_path / "twice_best_f1", *best_f1)["tasks"] == single["tasks"]
    log = data / "test.tsv"
    alone, doubled = tmp_path / "alone.tsv", tmp_path / "doubled.tsv"
    _predict([checkpoint], log, alone)
    _predict([checkpoint, checkpoint], log, doubled)
    assert doubled.read_text() == alone.read_text()


def test_an_ensemble_of_two_checkpoints_scores_the_mean_of_their_predictions(runs, tmp_path, capsys):
    from torchrec_mtl.train.metrics import TaskMetrics

    data, out, steps, _ = runs
    members = [steps[0], steps[2]]  # steps 4 and 9: two different models of one run
    log = data / "test.tsv"
    first, last = (_predict([m], log, tmp_path / f"member{i}.tsv") for i, m in enumerate(members))
    ensemble = _predict(members, log, tmp_path / "ensemble.tsv")
    assert np.abs(first[:, 1:] - last[:, 1:]).max() > 1e-3  # the members differ
    assert np.array_equal(ensemble[:, 0], first[:, 0])
    np.testing.assert_allclose(ensemble[:, 1:], (first[:, 1:] + last[:, 1:]) / 2, rtol=1e-5, atol=1e-6)

    capsys.readouterr()
    evaluation = _evaluate(members, tmp_path / "evaluation")
    printed = capsys.readouterr().out
    assert f"member 1: {members[0]} (step 4)" in printed and f"member 2: {members[1]} (step 9)" in printed
    assert "task    metric    member 1  member 2  ensemble" in printed and "ensemble of 2:" in printed
    assert [(m["checkpoint"], m["step"]) for m in evaluation["members"]] == [(str(members[0]), 4), (str(members[1]), 9)]
    assert evaluation["task_kinds"] == KINDS
    trained = json.loads((out / "results.json").read_text())["tasks"]  # training's evaluation of its last step
    for task, values in trained.items():
        for metric, value in values.items():
            assert evaluation["members"][1]["tasks"][task][metric] == pytest.approx(value, abs=1e-6), (task, metric)
    # the ensemble's metrics are those of the averaged scores (the test file's rows are the test split, in order)
    labels = np.load(out / "predictions.npz")
    metrics = TaskMetrics(KINDS, batch_size=len(ensemble), window_size=len(ensemble), device=torch.device("cpu"))
    metrics.update({task: torch.from_numpy(ensemble[:, 1 + i]) for i, task in enumerate(TASKS)},
                   {task: torch.from_numpy(labels[f"{task}.label"]) for task in TASKS})  # fmt: skip
    for task, values in metrics.compute().items():
        for metric, value in values.items():
            assert evaluation["tasks"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)


def test_a_member_of_other_tasks_is_refused_naming_it_before_anything_is_scored(runs, tmp_path, capsys):
    data, _, steps, other = runs
    arguments = ["--checkpoint", str(steps[2]), "--checkpoint", str(other)]
    capsys.readouterr()
    scores = tmp_path / "scores.tsv"
    assert main(["predict", *arguments, "--input", str(data / "test.tsv"), "--out", str(scores), "--quiet"]) == 2
    assert main(["evaluate", *arguments, "training.progress=false", f"out_dir={tmp_path / 'evaluation'}"]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and captured.out == "", captured
    for error in errors:  # the resolved step folder of the member, what differs, and the first member
        assert error.startswith(f"torchrec-mtl: --checkpoint {other / 'step-000000009'}: other tasks than the first "
                                f"member's ({steps[2]}): "), error  # fmt: skip
    assert not scores.exists() and not (tmp_path / "evaluation").exists()
