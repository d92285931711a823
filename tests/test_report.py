"""The run report: one self-contained HTML file with every task, figures as PNG beside it, notes where data lack."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from torchrec_mtl.report import (
    FIGURES,
    ReportError,
    binned_means,
    calibrated_tasks,
    roc_points,
    task_kinds,
    write_report,
)

imread = pytest.importorskip("matplotlib.image").imread  # matplotlib is an optional dependency

TASKS = ("ctr", "cvr", "rating", "ctcvr")
EXPERTS = 4
ROWS = 3000


def _binary(auc: float) -> dict:
    return {"auc": auc, "ceiling": auc + 0.02, "ne": 0.9, "calibration": 1.05, "gauc": auc - 0.01}


def _gates(shift: float) -> dict:
    usage = {"ctr": [0.1, 0.2, 0.3, 0.4], "cvr": [0.7, 0.1, 0.1, 0.1], "rating": [0.25, 0.25, 0.25, 0.25]}
    return {task: {"entropy": 1.0 - shift, "usage": shares} for task, shares in usage.items()}


def _curve_point(step: int) -> dict:
    grow = step / 3000
    return {
        "step": step,
        "epoch": 1 if step < 2000 else 2,
        "loss": 0.6 - grow / 10,
        "gates": _gates(grow / 5),
        "ctr": {"auc": 0.65 + grow / 10, "ne": 0.95, "calibration": 1.0},
        "cvr": {"auc": 0.60 + grow / 10, "ne": 0.97, "calibration": 1.0},
        "rating": {"mse": 0.5, "rmse": 0.7 - grow / 10, "mae": 0.55},
        "ctcvr": {"auc": 0.75 + grow / 10, "ne": 0.9, "calibration": 1.0},
    }


def results_dict() -> dict:
    """A small results.json with the structure run_job writes (see runs/main/results.json)."""
    tasks = {
        "ctr": _binary(0.76),
        "cvr": _binary(0.70),
        "rating": {"rmse": 0.585, "ceiling": 0.56, "mse": 0.342, "mae": 0.469},
        "ctcvr": _binary(0.84),
    }
    segment_tasks = {t: {k: v for k, v in m.items() if k not in ("ceiling", "gauc")} for t, m in tasks.items()}
    return {
        "tasks": tasks,
        "segments": {"cold": {"rows": 180, "tasks": segment_tasks}, "warm": {"rows": 2820, "tasks": segment_tasks}},
        "training": {
            "world_size": 1,
            "rows": {"train": 12000, "test": ROWS},
            "steps": 3000,
            "samples_per_s": 9021.7,
            "train_seconds": 12.5,
            "epoch_losses": [0.55, 0.5],
            "curve": [_curve_point(step) for step in (1000, 2000, 3000)],
            "effective_weights": {"ctr": 1.0, "cvr": 0.3, "rating": 0.3, "ctcvr": 1.0},
        },
        "diagnostics": {
            "gates": _gates(0.4),
            "gradient_cosine": {"ctr|cvr": 0.01, "ctr|ctcvr": 0.39},
            "warnings": ["expert 3 collapsed: mean gate weight <0.01> for every task"],
        },
        "config": {
            "model": {"tower": {"kind": "mmoe", "num_experts": EXPERTS}},
            "objective": {"weighting": "static", "products": {"ctcvr": {"of": ["ctr", "cvr"], "weight": 1.0}}},
            "training": {"epochs": 2, "batch_size": 64},
        },
    }


def write_predictions(path: Path, rows: int = ROWS, seed: int = 0) -> None:
    """Per task a prediction and a label drawn from it; NaN labels outside the task's sample space."""
    rng = np.random.default_rng(seed)
    p_click, p_conversion = rng.beta(1, 12, rows), rng.beta(2, 6, rows)
    click = (rng.random(rows) < p_click).astype(np.float32)
    conversion = np.where(click == 1, rng.random(rows) < p_conversion, np.nan)  # cvr: clicked rows only
    rating = rng.uniform(1, 5, rows)
    rated = np.where(rng.random(rows) < 0.7, rating + rng.normal(0, 0.5, rows), np.nan)
    arrays = {
        "ctr": (p_click, click),
        "cvr": (p_conversion, conversion),
        "rating": (rating, rated),
        "ctcvr": (p_click * p_conversion, np.nan_to_num(conversion)),
    }
    np.savez(
        path,
        **{
            f"{task}.{kind}": np.asarray(a, np.float32)
            for task, pair in arrays.items()
            for kind, a in zip(("prediction", "label"), pair)
        },
    )


def make_run(folder: Path, results: dict | None = None, predictions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results if results is not None else results_dict(), indent=2))
    if predictions:
        write_predictions(folder / "predictions.npz")
    return folder


def images(page: str) -> list:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def notes(page: str) -> list:
    return re.findall(r'<p class="note">(.*?)</p>', page)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run with predictions and its report, drawn once for the tests that only read it (a report takes seconds)."""
    run = make_run(tmp_path_factory.mktemp("full") / "run")
    write_report(run)
    return run


def test_the_report_is_one_self_contained_file_with_every_task_and_figure(full_run):
    run, out = full_run, full_run / "report.html"
    assert out.is_file()
    page = out.read_text(encoding="utf-8")

    sources = images(page)
    assert len(sources) == len(FIGURES), "one embedded image per figure"
    assert all(src.startswith("data:image/png;base64,") for src in sources), "no external or local file images"
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    for task in TASKS:
        assert f"<td>{task}</td>" in page, f"{task} missing from the metric table"
    assert page.count("<td>cold</td>") == len(TASKS) and page.count("<td>warm</td>") == len(TASKS)
    assert "&lt;0.01&gt;" in page, "warnings are shown, escaped"
    assert "9,022" in page and "mmoe (4 experts)" in page, "run summary: samples/s and the tower"
    assert "task ctcvr: a product of ctr × cvr, it has no gate of its own" in notes(page)

    for name, src in zip(FIGURES, sources):
        png = run / "report" / f"{name}.png"
        assert png.is_file(), name
        assert png.read_bytes() == base64.b64decode(src.split(",", 1)[1]), f"{name}: the embedded image is the file"
        pixels = imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, f"{name}: {pixels.shape}"
        assert pixels[..., :3].std() > 0.05, f"{name} is blank"


def test_without_predictions_the_prediction_figures_are_notes_and_stale_pngs_go(tmp_path):
    run = make_run(tmp_path / "run")
    write_report(run)
    (run / "predictions.npz").unlink()
    page = write_report(run).read_text(encoding="utf-8")
    assert notes(page).count(f"no predictions.npz in {run}") == 3  # ROC, calibration, regression
    assert len(images(page)) == 3
    drawn = sorted(p.stem for p in (run / "report").glob("*.png"))
    assert drawn == ["gate_entropy", "gate_usage", "training_curves"], "a figure from the earlier report is removed"
    assert all(f"<td>{task}</td>" in page for task in TASKS)


def test_a_tower_without_gates_and_a_task_missing_from_the_curve_get_notes(tmp_path):
    results = results_dict()
    results["diagnostics"]["gates"] = None
    results["config"]["model"]["tower"]["kind"] = "shared_bottom"
    for point in results["training"]["curve"]:
        del point["gates"], point["ctcvr"]
    page = write_report(make_run(tmp_path / "run", results)).read_text(encoding="utf-8")
    assert "task ctcvr: no AUC in the training curve" in notes(page)
    assert any("shared_bottom tower has none to show" in note for note in notes(page))
    assert any("records no gates" in note for note in notes(page))
    assert len(images(page)) == 4  # curves, ROC, calibration, regression
    assert not (tmp_path / "run" / "report" / "gate_usage.png").exists()


def test_a_task_absent_from_predictions_gets_a_note(tmp_path):
    run = make_run(tmp_path / "run", predictions=False)
    write_predictions(tmp_path / "all_tasks.npz")
    with np.load(tmp_path / "all_tasks.npz") as arrays:
        np.savez(run / "predictions.npz", **{k: arrays[k] for k in arrays.files if not k.startswith("cvr.")})
    page = write_report(run).read_text(encoding="utf-8")
    assert notes(page).count("task cvr: not in predictions.npz") == 2  # ROC and calibration
    assert len(images(page)) == len(FIGURES)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"training": {}}', "'tasks' must map"),
        ('{"tasks": {"ctr": 0.7}}', "'tasks' must map"),
        ("[1, 2]", "expected a JSON object"),
        ('{"tasks": {"ctr": {"auc": 0.7}}, "task_kinds": {"ctr": 1}}', "'task_kinds' must map"),
        (None, "not found"),
    ],
)
def test_a_missing_or_malformed_results_json_is_named(tmp_path, text, message):
    if text is not None:
        (tmp_path / "results.json").write_text(text)
    with pytest.raises(ReportError, match=message) as error:
        write_report(tmp_path)
    assert str(tmp_path / "results.json") in str(error.value)
    assert not (tmp_path / "report.html").exists()


def test_mismatched_prediction_arrays_are_named(tmp_path):
    run = make_run(tmp_path / "run", predictions=False)
    np.savez(run / "predictions.npz", **{"ctr.prediction": np.zeros(5, np.float32), "ctr.label": np.zeros(4)})
    with pytest.raises(ReportError, match=re.escape(str(run / "predictions.npz"))):
        write_report(run)


def test_a_custom_output_path_gets_its_figures_folder_beside_it_and_the_pngs_are_deterministic(full_run, tmp_path):
    out = write_report(full_run, tmp_path / "docs" / "mmoe.html")
    assert out == tmp_path / "docs" / "mmoe.html" and out.is_file()
    assert sorted(p.stem for p in (tmp_path / "docs" / "mmoe").glob("*.png")) == sorted(FIGURES)
    for name in FIGURES:
        again, first = tmp_path / "docs" / "mmoe" / f"{name}.png", full_run / "report" / f"{name}.png"
        assert again.read_bytes() == first.read_bytes(), f"{name} differs between two reports of the same run"


def _pairwise_auc(label: np.ndarray, score: np.ndarray) -> float:
    positive, negative = score[label == 1], score[label == 0]
    greater = (positive[:, None] > negative[None, :]).mean()
    return float(greater + 0.5 * (positive[:, None] == negative[None, :]).mean())


def test_roc_area_is_the_pairwise_auc_with_ties_counted_half():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 10, 400).astype(np.float64)  # many ties
    label = (rng.random(400) < score / 12).astype(np.float64)
    fpr, tpr, area = roc_points(label, score)
    assert area == pytest.approx(_pairwise_auc(label, score), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    metrics = pytest.importorskip("sklearn.metrics")
    assert area == pytest.approx(metrics.roc_auc_score(label, score), abs=1e-12)


def test_binned_means_uses_equal_count_bins_over_every_row():
    rng = np.random.default_rng(2)
    prediction = rng.beta(1, 20, 1003)
    label = (rng.random(1003) < prediction).astype(np.float64)
    predicted, observed, counts = binned_means(prediction, label, bins=20)
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1
    assert np.all(np.diff(predicted) >= 0)
    assert np.average(observed, weights=counts) == pytest.approx(label.mean())


def test_a_results_json_with_only_tasks_still_gets_a_report(tmp_path):
    results = results_dict()
    for key in ("segments", "diagnostics", "config"):
        del results[key]
    results["training"] = {"curve": []}
    page = write_report(make_run(tmp_path / "run", results, predictions=False)).read_text(encoding="utf-8")
    assert "results.json has no training curve (training.curve is empty)" in notes(page)
    assert images(page) == [] and all(f"<td>{task}</td>" in page for task in TASKS)


def _kinds_the_guess_gets_wrong() -> dict:
    """cvr a binary task without a calibration metric, ctcvr declared retrieval though its metrics look binary."""
    results = results_dict()
    del results["tasks"]["cvr"]["calibration"]
    results["task_kinds"] = {"ctr": "binary", "cvr": "binary", "rating": "regression", "ctcvr": "retrieval"}
    return results


def test_an_older_results_json_without_task_kinds_has_them_guessed_from_the_metrics():
    results = _kinds_the_guess_gets_wrong()
    del results["task_kinds"]
    assert task_kinds(results) == {"ctr": "binary", "cvr": "binary", "rating": "regression", "ctcvr": "binary"}
    assert calibrated_tasks(results) == ["ctr", "ctcvr"], "no calibration metric: taken for a retrieval task"


def test_the_declared_task_kinds_decide_the_tables_and_figures(tmp_path):
    results = _kinds_the_guess_gets_wrong()
    assert task_kinds(results) == results["task_kinds"]
    assert calibrated_tasks(results) == ["ctr", "cvr"]
    run = make_run(tmp_path / "run", results, predictions=False)
    write_predictions(tmp_path / "all_tasks.npz")
    with np.load(tmp_path / "all_tasks.npz") as arrays:  # cvr and ctcvr left out: their notes tell which figures
        np.savez(run / "predictions.npz", **{k: arrays[k] for k in arrays.files if k.startswith(("ctr.", "rating."))})
    page = write_report(run).read_text(encoding="utf-8")
    assert notes(page).count("task cvr: not in predictions.npz") == 2, "binary: ROC and calibration"
    assert notes(page).count("task ctcvr: not in predictions.npz") == 1, "retrieval: ROC only"
    assert page.count("<td>ctcvr</td><td>retrieval</td>") == 3, "the metric table and both segments"
    assert page.count("<td>cvr</td><td>binary</td>") == 3
