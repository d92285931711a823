"""The stages after training, end to end through the CLI on a small run with item text: evaluate a checkpoint,
predict a log, export TorchScript (fp32 and int8 tables) that loads without this package, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_PASS
from torchrec_mtl.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(small_log, tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    common = [f"data.dir={small_log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", f"model.text.encoder={tiny_bert_dir}",
              "model.text.cache=item_text_tiny.npz", "training.batch_size=256", "training.curve_every=50",
              "training.progress=false"]  # fmt: skip
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", *common]) == 0
    return out, common


def test_evaluate_scores_a_checkpoint_as_training_did(run, capsys):
    out, common = run
    assert main(["evaluate", "--config", "configs/mmoe_synthetic.yaml", *common]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    trained = json.loads((out / "results.json").read_text())
    assert evaluation["step"] == trained["training"]["steps"]
    for task, values in trained["tasks"].items():
        for metric, value in values.items():
            assert evaluation["tasks"][task][metric] == pytest.approx(value, abs=1e-6), (task, metric)
    assert "step-" in capsys.readouterr().out


def test_evaluate_needs_no_config_beside_a_checkpoint_that_recorded_one(run):
    out, _ = run
    (out / "evaluation.json").unlink(missing_ok=True)
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints"), "training.progress=false"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    trained = json.loads((out / "results.json").read_text())
    for task, values in trained["tasks"].items():
        metric = next(iter(values))
        assert evaluation["tasks"][task][metric] == pytest.approx(values[metric], abs=1e-6), task


def test_predict_scores_every_line_and_counts_the_rejected_ones(run, small_log, tmp_path, capsys):
    out, _ = run
    lines = (small_log / "test.tsv").read_text().splitlines(keepends=True)
    log = tmp_path / "to_score.tsv"
    log.write_text("".join(lines[:300]) + "1\tyes\n" + "".join(lines[300:500]))  # line 301 is broken
    scores = tmp_path / "scores.tsv"
    code = main(["predict", "--checkpoint", str(out / "checkpoints"), "--input", str(log), "--out", str(scores),
                 "--quiet"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["lines"] == 501 and summary["scored"] == 500 and summary["rejected"] == 1
    assert summary["reasons"] == {"too few fields": 1}
    header, *rows = scores.read_text().splitlines()
    assert header.split("\t") == ["line", "ctr", "cvr", "rating", "ctcvr"]
    table = np.array([[float(v) for v in row.split("\t")] for row in rows])
    assert table[:, 0].tolist() == [*range(1, 301), *range(302, 502)]
    # the same rows' predictions as the training run's evaluation wrote them (the test file in order)
    saved = np.load(out / "predictions.npz")
    for column, task in enumerate(["ctr", "cvr", "rating", "ctcvr"], start=1):
        np.testing.assert_allclose(table[:, column], saved[f"{task}.prediction"][:500], rtol=1e-4, atol=1e-5)


def _score_in_a_bare_process(model: Path, dense: np.ndarray, sparse: np.ndarray, folder: Path) -> dict:
    """Load the artifact where only torch and fbgemm_gpu are imported, and score the rows."""
    np.save(folder / "dense.npy", dense)
    np.save(folder / "sparse.npy", sparse)
    script = f"""
import sys, numpy as np, torch, fbgemm_gpu
model = torch.jit.load({str(model)!r})
outputs = model(torch.from_numpy(np.load({str(folder / 'dense.npy')!r})), torch.from_numpy(np.load({str(folder / 'sparse.npy')!r})))
assert "torchrec_mtl" not in sys.modules and "torchrec" not in sys.modules, sorted(m for m in sys.modules if "torchrec" in m)
np.savez({str(folder / 'outputs.npz')!r}, **{{k: v.numpy() for k, v in outputs.items()}})
"""
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(folder / "outputs.npz"))


# int8 tables: measured 4e-4 on the probabilities, 3e-3 on the rating (1 to 5 stars)
@pytest.mark.parametrize("quantize, tolerance", [(False, 1e-4), (True, 0.01)])
def test_an_exported_model_loads_without_this_package_and_agrees_with_the_trained_one(run, tmp_path, quantize,
                                                                                      tolerance):  # fmt: skip
    from torchrec_mtl.inference import load_trained
    from torchrec_mtl.predict import _Encoder

    out, _ = run
    folder = tmp_path / "export"
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(folder)]
                + (["--quantize"] if quantize else [])) == 0  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outputs"] == {"ctr": "binary", "cvr": "binary", "rating": "regression", "ctcvr": "binary"}
    assert manifest["quantized"] is quantize and manifest["inputs"]["sparse_ids"]["columns"][-1] == "item_text"
    trained = load_trained(out / "checkpoints")
    chunk = b"".join(Path(trained.config.data.dir, "test.tsv").open("rb").readlines()[:1000])
    _, dense, sparse, _ = _Encoder(trained).encode(chunk, 1)
    exported = _score_in_a_bare_process(folder / "model.pt", dense, sparse, tmp_path)
    import torch

    with torch.no_grad():
        expected = trained.inference(torch.from_numpy(dense), torch.from_numpy(sparse))
    trained_run = np.load(out / "predictions.npz")  # the sharded model's own scores of the same test rows
    for task, values in expected.items():
        assert np.abs(exported[task] - values.numpy()).max() <= tolerance, task
        assert np.abs(exported[task] - trained_run[f"{task}.prediction"][:1000]).max() <= tolerance, task


def test_train_writes_the_report_and_the_report_command_rewrites_it(run, tmp_path, capsys):
    out, _ = run
    page = (out / "report.html").read_text()  # written at the end of train
    assert page.count("data:image/png;base64,") == 6 and all(task in page for task in ("ctr", "cvr", "rating", "ctcvr"))
    assert main(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "again.html")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in (out / "report").iterdir())
    assert main(["report", str(tmp_path / "nothing")]) == 2  # no results.json: one line naming it, no traceback
    assert "results.json" in capsys.readouterr().err


def test_train_keeps_a_log_of_what_it_printed(run):
    out, _ = run
    log = (out / "train.log").read_text()
    assert "sharded tables on 1 process(es): " in log and "task    metric     value" in log
    # the plan as counts; the plan itself only when asked (training.print_plan); no progress-bar redraws in a log
    assert "(-v or training.print_plan=true prints the plan)" in log and "| fused" not in log and "\r" not in log
    # a line per curve point: the windowed metrics of the last 100 training batches
    assert "step 50/125 (epoch 1): loss " in log and "ctr auc " in log and "rating rmse " in log


def test_train_writes_tensorboard_event_files(run):
    pytest.importorskip("tensorboard", reason="tensorboard is the optional 'tensorboard' extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr_scale", "train/ctr/auc", "train/rating/rmse", "test/ctcvr/auc"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [50, 100]
    trained = json.loads((out / "results.json").read_text())
    (final,) = events.Scalars("test/ctr/auc")
    assert final.step == 125 and final.value == pytest.approx(trained["tasks"]["ctr"]["auc"], abs=1e-6)


def test_generate_writes_the_log_its_items_and_its_truth(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path), "--rows", "3000", "--seed", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sum(printed["rows"].values()) == 3000 and 0.5 < printed["ceilings"]["ctr_auc"] < 1.0
    for name in ("train.tsv", "test.tsv", "items.tsv", "test_truth.tsv", "meta.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    lines = (tmp_path / "train.tsv").read_text().splitlines() + (tmp_path / "test.tsv").read_text().splitlines()
    assert len(lines) == 3000 and all(len(line.split("\t")) == 3 + 13 + 8 for line in lines[:50])


def test_predict_reads_standard_input(run, small_log, tmp_path):
    out, _ = run
    lines = (small_log / "test.tsv").read_bytes().splitlines(keepends=True)[:200]
    result = subprocess.run(
        [sys.executable, "-m", "torchrec_mtl.cli", "predict", "--checkpoint", str(out / "checkpoints"), "--input", "-",
         "--quiet"],
        input=b"".join(lines), cwd=ROOT, capture_output=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    header, *rows = result.stdout.decode().splitlines()
    assert header == "line\tctr\tcvr\trating\tctcvr" and len(rows) == 200
    saved = np.load(out / "predictions.npz")["ctr.prediction"][:200]
    np.testing.assert_allclose([float(r.split("\t")[1]) for r in rows], saved, rtol=1e-4, atol=1e-5)
    assert json.loads(result.stderr.decode().strip().splitlines()[-1])["scored"] == 200


def test_a_redirected_run_log_holds_lines_not_progress_bar_redraws(small_log, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "console.txt", "w") as console:  # stdout and stderr to a file, as a scheduler keeps them
        subprocess.run(
            [sys.executable, "-m", "torchrec_mtl.cli", "train", "--config", "configs/mmoe_synthetic.yaml",
             f"data.dir={small_log}", "data.generate=null", *ONE_PASS, "model.text=null", f"out_dir={out}",
             "training.batch_size=512", "training.curve_every=20"],  # progress left on, as by default
            stdout=console, stderr=subprocess.STDOUT, check=True, cwd=ROOT,
        )  # fmt: skip
    text = (tmp_path / "console.txt").read_text()
    assert "\r" not in text, "a progress bar redrew itself into the log"
    assert "step 20/" in text and "task    metric     value" in text
