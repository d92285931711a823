"""Model selection on validation rows (training.early_stopping): the epoch picked is the one a scan of the
validation curve picks, its weights are the ones tested and saved last, and training stops after ``patience`` epochs
without improvement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from torchrec_mtl.cli import main
from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.run.selection import best_epoch, epochs_without_improvement, selection_score

CONFIG = "configs/mmoe_synthetic.yaml"


def test_the_selected_epoch_is_the_first_best_of_the_curve_as_a_scan_finds_it():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scores = rng.integers(0, 6, rng.integers(1, 9)) / 10  # ties are common
        curve = [{"score": float(s)} for s in scores]
        assert best_epoch(curve, 0.0) == int(np.argmax(scores))
        assert epochs_without_improvement(curve, 0.0) == len(scores) - 1 - int(np.argmax(scores))
        # with min_delta, an epoch is selected only when it beats the selected one by more than it
        delta = 0.15
        chosen = 0
        for i, s in enumerate(scores):
            if s > scores[chosen] + delta:
                chosen = i
        assert best_epoch(curve, delta) == chosen


def test_the_score_is_higher_is_better_for_every_metric():
    metrics = {"ctr": {"auc": 0.7, "ne": 0.9}, "cvr": {"auc": 0.6}, "rating": {"rmse": 0.5, "mae": 0.4}}
    kinds = {"ctr": "binary", "cvr": "binary", "rating": "regression"}
    assert selection_score(metrics, kinds, "mean_auc") == pytest.approx(0.65)
    assert selection_score(metrics, kinds, "ctr.auc") == 0.7
    assert selection_score(metrics, kinds, "ctr.ne") == -0.9
    assert selection_score(metrics, kinds, "rating.rmse") == -0.5
    with pytest.raises(ConfigError, match="task rating reports rmse, mae"):
        selection_score(metrics, kinds, "rating.auc")


def test_early_stopping_needs_validation_rows_and_a_known_metric():
    with pytest.raises(ConfigError, match="data.validation_fraction is 0"):
        load_config(CONFIG, ["data.validation_fraction=0", "training.early_stopping={}"])
    with pytest.raises(ConfigError, match="training.early_stopping.metric: 'clicks.auc'"):
        load_config(CONFIG, ["data.validation_fraction=0.1", "training.early_stopping={metric: clicks.auc}"])
    with pytest.raises(ConfigError, match="patience 0"):
        load_config(CONFIG, ["data.validation_fraction=0.1", "training.early_stopping={patience: 0}"])


def _train(small_log, out, *overrides):
    common = [f"data.dir={small_log}", "data.generate=null", "model.text=null", f"out_dir={out}",
              "training.batch_size=1024", "training.progress=false", "training.curve_every=0",
              "data.validation_fraction=0.1"]  # fmt: skip
    assert main(["train", "--config", CONFIG, *common, *overrides]) == 0
    return json.loads((out / "results.json").read_text())


def test_the_selected_epoch_is_the_scan_of_the_curve_and_its_model_is_the_one_tested(small_log, tmp_path, capsys):
    results = _train(small_log, tmp_path / "run", "training.epochs=3", "training.early_stopping={patience: 5}")
    training = results["training"]
    curve = training["validation"]
    assert [point["epoch"] for point in curve] == [1, 2, 3] and not training["stopped_early"]
    scores = [point["score"] for point in curve]
    assert scores == [np.mean([p["tasks"][t]["auc"] for t in ("ctr", "cvr", "ctcvr")]) for p in curve]
    chosen = curve[int(np.argmax(scores))]
    assert training["selected"] == {k: chosen[k] for k in ("epoch", "step", "score")}
    # the test metrics are the selected model's: the best checkpoint, evaluated on its own, gives them
    best = tmp_path / "run" / "checkpoints" / "best" / f"step-{chosen['step']:09d}"
    assert main(["evaluate", "--config", CONFIG, "--checkpoint", str(best), f"data.dir={small_log}",
                 "data.generate=null", "model.text=null", f"out_dir={tmp_path / 'run'}", "training.progress=false",
                 "data.validation_fraction=0.1"]) == 0  # fmt: skip
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    for task in ("ctr", "cvr", "rating", "ctcvr"):
        headline = next(iter(results["tasks"][task]))
        assert evaluation["tasks"][task][headline] == pytest.approx(results["tasks"][task][headline], abs=1e-6)


def test_training_stops_after_patience_epochs_without_improvement(small_log, tmp_path):
    # min_delta 1: no later epoch can beat the first, so the run stops after epoch 1 + patience
    results = _train(small_log, tmp_path / "run", "training.epochs=5",
                     "training.early_stopping={patience: 2, min_delta: 1.0}")  # fmt: skip
    training = results["training"]
    assert [point["epoch"] for point in training["validation"]] == [1, 2, 3]
    assert training["stopped_early"] and training["selected"]["epoch"] == 1
    assert training["steps"] == 3 * training["validation"][0]["step"]


def test_validating_every_n_steps_trains_the_same_batches_and_adds_points_inside_epochs(small_log, tmp_path):
    by_epoch = _train(small_log, tmp_path / "by_epoch", "training.epochs=2", "training.early_stopping={patience: 99}")
    per_epoch = by_epoch["training"]["validation"][0]["step"]
    every = 3 if per_epoch % 3 else 4
    by_steps = _train(small_log, tmp_path / "by_steps", "training.epochs=2",
                      f"training.early_stopping={{patience: 99, every_steps: {every}}}")  # fmt: skip
    curve = by_steps["training"]["validation"]
    expected = sorted(set(range(every, 2 * per_epoch + 1, every)) | {per_epoch, 2 * per_epoch})
    assert [point["step"] for point in curve] == expected
    assert [point["epoch"] for point in curve] == [1 + (step - 1) // per_epoch for step in expected]
    # a segment's end drains the pipeline without skipping or replaying a batch: at each epoch's end the model is
    # the one trained without points inside the epoch, to the last bit
    at_epoch_ends = [point["score"] for point in curve if point["step"] % per_epoch == 0]
    assert at_epoch_ends == [point["score"] for point in by_epoch["training"]["validation"]]
    assert by_steps["training"]["steps"] == by_epoch["training"]["steps"]


def test_patience_counts_points_inside_epochs(small_log, tmp_path):
    results = _train(small_log, tmp_path / "run", "training.epochs=5",
                     "training.early_stopping={patience: 2, min_delta: 1.0, every_steps: 2}")  # fmt: skip
    training = results["training"]
    assert [point["step"] for point in training["validation"]] == [2, 4, 6]
    assert training["stopped_early"] and training["selected"]["step"] == 2 and training["steps"] == 6


def test_validation_rows_can_come_from_files_of_their_own(small_log, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = (small_log / "train.tsv").read_text().splitlines(keepends=True)
    (data / "train.tsv").write_text("".join(lines[:-4000]))
    (data / "validation.tsv").write_text("".join(lines[-4000:]))
    (data / "test.tsv").write_text((small_log / "test.tsv").read_text())
    out = tmp_path / "run"
    assert main(["train", "--config", CONFIG, f"data.dir={data}", "data.generate=null", "model.text=null",
                 f"out_dir={out}", "training.batch_size=1024", "training.progress=false", "training.curve_every=0",
                 "data.validation=[validation.tsv]", "data.validation_fraction=0", "training.epochs=2",
                 "training.early_stopping={patience: 5}"]) == 0  # fmt: skip
    training = json.loads((out / "results.json").read_text())["training"]
    assert training["rows"] == {"train": len(lines) - 4000, "validation": 4000, "test": training["rows"]["test"]}
    assert [point["epoch"] for point in training["validation"]] == [1, 2]
    with pytest.raises(ConfigError, match="validation rows come from one of them"):
        load_config(CONFIG, ["data.validation_fraction=0.1", "data.validation=[validation.tsv]"])
