"""Precision, recall and F1 at a threshold, the best-F1 threshold, and both in the main job's results."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

import numpy as np
import pytest

from conftest import ONE_PASS, SMALL
from torchrec_mtl.config import load_config
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.data.synthetic import generate
from torchrec_mtl.data.splits import split_validation
from torchrec_mtl.results import format_table
from torchrec_mtl.run import run_job
from torchrec_mtl.train.thresholds import best_f1_threshold, threshold_metrics

NAN = np.nan


def test_threshold_metrics_by_hand_with_ties_at_the_threshold_and_nan_labels():
    p = np.array([0.9, 0.6, 0.6, 0.6, 0.3, 0.2, 0.95], dtype=np.float32)
    y = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, NAN])  # the 0.95 row is outside the task
    # p >= 0.6: rows 0-3 (the three tied at 0.6 included): TP 3 of 4 predicted, 3 of 4 positives found
    assert threshold_metrics(p, y, 0.6) == {"threshold": 0.6, "precision": 0.75, "recall": 0.75, "f1": 0.75}
    # p >= 0.61: rows 0 only: precision 1, recall 1/4, F1 = 2 * 1 * 0.25 / 1.25
    assert threshold_metrics(p, y, 0.61) == pytest.approx(
        {"threshold": 0.61, "precision": 1.0, "recall": 0.25, "f1": 0.4}
    )
    # everything positive: precision 4/6, recall 1
    assert threshold_metrics(p, y, 0.1) == pytest.approx(
        {"threshold": 0.1, "precision": 4 / 6, "recall": 1.0, "f1": 0.8}
    )


def test_empty_denominators_give_zero_not_nan():
    p, y = np.array([0.2, 0.4]), np.array([1.0, 0.0])
    assert threshold_metrics(p, y, 0.5) == {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    no_positive = threshold_metrics(p, np.array([0.0, 0.0]), 0.3)  # one false positive, nothing to recall
    assert no_positive == {"threshold": 0.3, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    only_nan = threshold_metrics(p, np.array([NAN, NAN]), 0.3)
    assert only_nan == {"threshold": 0.3, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_best_f1_threshold_by_hand_takes_tied_scores_together():
    # The four rows at 0.5 go positive together: TP 2, predicted 4, positives 3: F1 4/7. At 0.3: TP 3, predicted
    # 5: F1 6/8, the best. A sweep row by row would score the first two tied rows alone (TP 2, predicted 2: F1 4/5)
    # and return 0.5, a threshold that in fact takes all four.
    p = np.array([0.5, 0.5, 0.5, 0.5, 0.3])
    assert best_f1_threshold(p, np.array([1.0, 1.0, 0.0, 0.0, 1.0])) == 0.3
    # the same scores, the tie's rows in any order, give the same threshold
    assert best_f1_threshold(p, np.array([0.0, 1.0, 0.0, 1.0, 1.0])) == 0.3
    # three positives in the tie: 0.5 is the best (TP 3, predicted 4: F1 6/7; 0.3: F1 6/8)
    assert best_f1_threshold(p, np.array([1.0, 1.0, 1.0, 0.0, 0.0])) == 0.5
    # NaN labels are ignored: the 0.99 row is not a false positive
    assert best_f1_threshold(np.array([0.99, 0.7, 0.1]), np.array([NAN, 1.0, 0.0])) == 0.7
    # equal F1s: the highest threshold (0.8: F1 2/3; 0.4: TP 2, predicted 4, F1 2/3)
    assert best_f1_threshold(np.array([0.8, 0.6, 0.5, 0.4]), np.array([1.0, 0.0, 0.0, 1.0])) == 0.8
    # no positive label: every F1 is 0 and the highest score is returned
    assert best_f1_threshold(np.array([0.3, 0.7]), np.array([0.0, 0.0])) == 0.7


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no row with a label"):
        best_f1_threshold(np.array([0.3]), np.array([NAN]))
    with pytest.raises(ValueError, match="expected 0, 1 or NaN, got \\[2.0\\]"):
        threshold_metrics(np.array([0.3, 0.4]), np.array([2.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="two equal 1-d arrays"):
        best_f1_threshold(np.array([0.3, 0.4]), np.array([1.0]))


def _brute_force_best(p: np.ndarray, y: np.ndarray):
    """Every distinct labelled score as a threshold, F1 as an exact fraction: (best F1, highest threshold with it)."""
    labelled = ~np.isnan(y)
    p, y = p[labelled], y[labelled]
    positives = int((y == 1).sum())
    best = None
    for t in sorted(set(p.tolist()), reverse=True):
        predicted = p >= t
        f1 = Fraction(2 * int((predicted & (y == 1)).sum()), int(predicted.sum()) + positives)
        if best is None or f1 > best[0]:
            best = (f1, t)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_best_f1_threshold_matches_a_brute_force_sweep(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    # rounded scores: many ties; labels that follow the score a little; some rows outside the task
    p = np.round(rng.random(n), int(rng.integers(1, 4))).astype(np.float32)
    y = (rng.random(n) < 0.2 + 0.6 * p).astype(np.float64)
    y[rng.random(n) < 0.1] = NAN
    if np.isnan(y).all():
        y[0] = 1.0
    f1, expected = _brute_force_best(p.astype(np.float64), y)
    chosen = best_f1_threshold(p, y)
    assert chosen == expected, (seed, chosen, expected)
    order = rng.permutation(n)  # the rows' order (within ties too) does not matter
    assert best_f1_threshold(p[order], y[order]) == chosen
    assert threshold_metrics(p, y, chosen)["f1"] == pytest.approx(float(f1), abs=1e-12)


def test_split_validation_holds_out_a_seeded_disjoint_share_of_each_shard():
    def shard(start: int, rows: int) -> EncodedLog:  # dense column 0 = the row's identity
        ids = np.arange(start, start + rows, dtype=np.float32)[:, None]
        return EncodedLog(ids, np.zeros((rows, 1), np.int64), {"click": np.zeros(rows, np.float32)})

    shards = [shard(0, 100), shard(100, 50)]
    train, validation = split_validation(shards, 0.1, seed=3)
    ids = lambda parts: np.concatenate([part.dense[:, 0] for part in parts])  # noqa: E731
    assert [len(part) for part in validation] == [10, 5] and [len(part) for part in train] == [90, 45]
    assert np.array_equal(np.sort(np.concatenate([ids(train), ids(validation)])), np.arange(150))
    again = split_validation(shards, 0.1, seed=3)[1]
    assert np.array_equal(ids(again), ids(validation)), "the same seed holds out the same rows"
    assert not np.array_equal(ids(split_validation(shards, 0.1, seed=4)[1]), ids(validation))
    unsplit, none = split_validation(shards, 0.0, seed=3)
    assert unsplit is shards and none == []


def test_format_table_shows_the_threshold_metrics_below_the_headline_table():
    table = format_table(
        {
            "ctr": {"auc": 0.75, "ceiling": 0.78, "ne": 0.9, "threshold": 0.125, "precision": 0.25, "recall": 0.5,
                    "f1": 1 / 3},
            "rating": {"rmse": 0.6, "mae": 0.5},
        }
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[1].split() == ["ctr", "auc", "0.7500", "0.7800", "0.0300", "ne", "0.9000"]
    assert lines[3].split() == ["task", "threshold", "precision", "recall", "f1"]
    assert lines[4].split() == ["ctr", "0.1250", "0.2500", "0.5000", "0.3333"] and len(lines) == 5


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory):
    """A 10,000-row synthetic log: the job runs below only need predictions to score, not a good model."""
    out = tmp_path_factory.mktemp("tiny_log")
    generate(dataclasses.replace(SMALL, num_rows=10_000), out)
    return out


def _train(log, out, *overrides):
    """A quick run of the main job (no item text, report, checkpoint or curve); its results and predictions."""
    config = load_config("configs/mmoe_synthetic.yaml", [
        f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null", "training.batch_size=512",
        "training.eval_batch_size=4096", "training.progress=false", "training.print_plan=false",
        "training.curve_every=0", "objective.gradient_cosine_every=0", "checkpoint.at_end=false",
        "checkpoint.every_seconds=0", "checkpoint.resume=never", *overrides])  # fmt: skip
    run_job(config)
    return json.loads((out / "results.json").read_text()), np.load(out / "predictions.npz")


def _recomputed(predictions, task: str, threshold: float):
    return threshold_metrics(predictions[f"{task}.prediction"], predictions[f"{task}.label"], threshold)


def test_best_f1_threshold_is_chosen_on_held_out_rows_and_scored_on_the_test_rows(tiny_log, tmp_path, capsys):
    results, predictions = _train(tiny_log, tmp_path, "data.validation_fraction=0.1", "evaluation.threshold=best_f1")
    meta = json.loads((tiny_log / "meta.json").read_text())
    rows = results["training"]["rows"]
    # the validation rows are held out of training: the loader's full batches cover only the rest
    assert rows["train"] + rows["validation"] == meta["rows"]["train"] and rows["test"] == meta["rows"]["test"]
    assert rows["validation"] == pytest.approx(0.1 * meta["rows"]["train"], abs=2)
    assert results["training"]["steps"] == rows["train"] // 512
    assert f"{rows['train']:,} train, {rows['validation']:,} validation and" in capsys.readouterr().out
    for task in ("ctr", "cvr", "ctcvr"):
        values = results["tasks"][task]
        assert list(values)[0] == "auc" and list(values)[-4:] == ["threshold", "precision", "recall", "f1"]
        assert 0.0 < values["threshold"] < 1.0 and values["threshold"] != 0.5
        recomputed = _recomputed(predictions, task, values["threshold"])
        assert values == pytest.approx({**values, **recomputed}, abs=1e-12), task
    assert results["tasks"]["ctr"]["f1"] > 0.0  # a threshold fit to ~5% positives, not 0.5, which flags none
    assert "f1" not in results["tasks"]["rating"]
    assert results["config"]["evaluation"] == {"threshold": "best_f1"}


def test_a_fixed_threshold_scores_the_test_predictions_at_it(tiny_log, tmp_path):
    results, predictions = _train(tiny_log, tmp_path, "evaluation.threshold=0.5")
    assert "validation" not in results["training"]["rows"]
    for task in ("ctr", "cvr", "ctcvr"):
        values = results["tasks"][task]
        assert values["threshold"] == 0.5
        assert {k: values[k] for k in ("precision", "recall", "f1")} == pytest.approx(
            {k: v for k, v in _recomputed(predictions, task, 0.5).items() if k != "threshold"}, abs=1e-12
        ), task
