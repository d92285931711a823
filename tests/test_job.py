"""The main job end to end through the CLI: it learns from the data, and from nothing else."""

from __future__ import annotations

import json

import pytest

from torchrec_mtl.cli import main
from conftest import ONE_PASS


def _train(small_log, out, *overrides):
    code = main(
        [
            "train",
            "--config",
            "configs/mmoe_synthetic.yaml",
            f"data.dir={small_log}",
            "data.generate=null", *ONE_PASS,
            f"out_dir={out}",
            "training.batch_size=256",
            "training.eval_batch_size=2048",
            "training.progress=false",
            *overrides,
        ]
    )
    assert code == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(small_log, tmp_path_factory):
    return _train(small_log, tmp_path_factory.mktemp("run"), "training.curve_every=25")


def test_results_hold_each_task_metric_beside_its_ceiling(trained, small_log, capsys):
    meta = json.loads((small_log / "meta.json").read_text())
    tasks = trained["tasks"]
    assert set(tasks) == {"ctr", "cvr", "ctcvr", "rating"}
    for task in ("ctr", "cvr", "ctcvr"):
        assert tasks[task]["ceiling"] == meta["ceilings"][f"{task}_auc"]
        assert 0.0 <= tasks[task]["auc"] <= 1.0 and {"ne", "calibration", "gauc"} <= set(tasks[task])
    # per-user AUC removes the between-user spread that the global AUC also scores
    assert 0.5 < tasks["ctr"]["gauc"] < tasks["ctr"]["auc"]
    assert tasks["rating"]["ceiling"] == meta["ceilings"]["rating_rmse"]
    assert trained["training"]["rows"] == meta["rows"]
    gates = trained["diagnostics"]["gates"]  # the MMoE's gates, watched during evaluation
    assert set(gates) == {"ctr", "cvr", "rating"} and abs(sum(gates["cvr"]["usage"]) - 1.0) < 1e-6
    assert 0.0 < gates["ctr"]["entropy"] <= 1.3863 + 1e-6  # log(4 experts)
    curve = trained["training"]["curve"]  # every 25 steps: loss and each task's metrics over the last 100 batches
    assert [point["step"] for point in curve] == list(range(25, trained["training"]["steps"] + 1, 25))
    assert {"ctr", "cvr", "rating", "ctcvr", "loss"} <= set(curve[-1]) and "auc" in curve[-1]["ctcvr"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    # the gates during training, over each point's window: a distribution over the 4 experts per task
    assert all(set(point["gates"]) == {"ctr", "cvr", "rating"} for point in curve)
    assert abs(sum(curve[0]["gates"]["ctr"]["usage"]) - 1.0) < 1e-6 and curve[0]["gates"]["ctr"]["entropy"] > 0
    cosines = trained["diagnostics"]["gradient_cosine"]  # 125 steps: sampled once, at step 63
    assert set(cosines) == {"ctr|cvr", "ctr|rating", "ctr|ctcvr", "cvr|rating", "cvr|ctcvr", "rating|ctcvr"}
    assert all(-1.0 <= value <= 1.0 for value in cosines.values()) and cosines["ctr|ctcvr"] > 0


def test_the_model_learns_the_planted_signal(trained):
    tasks = trained["tasks"]
    # 32,000 training rows are far too few to reach the ceiling; they are plenty to be well clear of chance
    # (the shuffled-label run below stays within 0.04 of 0.5).
    assert tasks["ctr"]["auc"] > 0.6, tasks["ctr"]
    assert tasks["ctcvr"]["auc"] > 0.65, tasks["ctcvr"]
    assert tasks["rating"]["rmse"] < 0.8, tasks["rating"]
    assert tasks["ctr"]["auc"] <= tasks["ctr"]["ceiling"] + 0.01, "above the Bayes ceiling: a leak"


def test_uncertainty_weighting_learns_per_term_weights_through_the_sharded_pipeline(small_log, tmp_path):
    results = _train(small_log, tmp_path, "objective.weighting=uncertainty")
    weights = results["training"]["effective_weights"]
    assert set(weights) == {"ctr", "ctcvr", "cvr", "rating"}
    # rating's squared error (~0.4) sits above the click losses (~0.2): its log-variance rises, its weight falls
    assert weights["rating"] < 0.5 * weights["ctr"] and weights["ctr"] > 1.0, weights
    assert results["tasks"]["ctr"]["auc"] > 0.6


def test_gradnorm_moves_the_multipliers_inside_the_sharded_pipeline(small_log, tmp_path):
    results = _train(small_log, tmp_path, "objective.weighting=gradnorm")
    static = {"ctr": 1.0, "cvr": 0.3, "rating": 0.3, "ctcvr": 1.0}
    multipliers = {term: weight / static[term] for term, weight in results["training"]["effective_weights"].items()}
    assert set(multipliers) == set(static) and abs(sum(multipliers.values()) - 4.0) < 1e-4
    assert max(abs(m - 1.0) for m in multipliers.values()) > 0.05, multipliers
    assert results["tasks"]["ctr"]["auc"] > 0.6


def test_shuffled_labels_leave_nothing_to_learn(small_log, tmp_path, trained):
    tasks = _train(small_log, tmp_path, "training.shuffle_labels=true")["tasks"]
    # Not exactly 0.5: a model fit to noise still ranks test rows along some feature direction, which correlates
    # with the real labels by chance (seeds 0-2 on this log: CTR 0.55, 0.50, 0.55; CTCVR 0.53, 0.46, 0.59).
    assert abs(tasks["ctr"]["auc"] - 0.5) < 0.08, tasks["ctr"]
    for task in ("ctr", "ctcvr"):
        assert tasks[task]["auc"] < trained["tasks"][task]["auc"] - 0.08, (task, tasks[task], trained["tasks"][task])


def test_a_click_only_criteo_log_trains_with_declared_tasks_and_wrong_labels_are_named(tmp_path, capsys):
    from torchrec_mtl.data.criteo_format import write_criteo_log

    write_criteo_log(tmp_path / "day_0.tsv", 3000, progress=False)
    common = ["train", "--config", "configs/mmoe_synthetic.yaml", f"data.dir={tmp_path}", "data.generate=null", *ONE_PASS,
              "data.schema=configs/datasets/criteo_kaggle.yaml", "data.train=[day_0.tsv]", "data.test_fraction=0.2",
              f"out_dir={tmp_path / 'out'}", "training.progress=false", "training.batch_size=128"]  # fmt: skip
    assert main([*common, "objective.tasks={ctr: {label: click}}", "objective.products={}"]) == 2
    assert (
        "model.text: the schema configs/datasets/criteo_kaggle.yaml declares no item_text_key"
        in capsys.readouterr().err
    )
    common.append("model.text=null")
    assert main(common) == 2, "the default ESMM tasks need conversion and rating"
    error = capsys.readouterr().err
    assert "objective.tasks.cvr.label: 'conversion' is not a label of configs/datasets/criteo_kaggle.yaml" in error
    assert "its labels: click" in error and "Traceback" not in error

    assert main([*common, "objective.tasks={ctr: {label: click}}", "objective.products={}"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["tasks"]) == ["ctr"] and 0.0 <= results["tasks"]["ctr"]["auc"] <= 1.0
    assert results["diagnostics"]["gates"]["ctr"]["usage"]
