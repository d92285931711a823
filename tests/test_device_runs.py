"""The whole path (train -> evaluate -> predict -> export) off the default layout: an explicit device index
(``cpu:0``, which a comparison against ``torch.device("cpu")`` anywhere would trip), bf16 and fp16 autocast on the
host, and the same path on a CUDA GPU when there is one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from torchrec_mtl.cli import main
from conftest import ONE_PASS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/mmoe_synthetic.yaml"
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False here (tools/gpu_check.sh runs this path on one)"


def _overrides(small_log: Path, out: Path) -> List[str]:
    return [f"data.dir={small_log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null",
            "training.batch_size=512", "training.eval_batch_size=4096", "training.curve_every=20",
            "training.progress=false"]  # fmt: skip


def _headlines(tasks: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {task: values.get("auc", values.get("rmse")) for task, values in tasks.items()}


def _finite_training(results: Dict) -> None:
    training = results["training"]
    losses = training["epoch_losses"] + [point["loss"] for point in training["curve"]]
    assert len(training["curve"]) >= 3 and all(math.isfinite(loss) for loss in losses), losses


@pytest.fixture(scope="module")
def reference(small_log, tmp_path_factory):
    """fp32, the run's device torch.device("cpu", 0), given to the process group explicitly."""
    from torchrec_mtl.config import load_config
    from torchrec_mtl.run import run_job
    from torchrec_mtl.train.distributed import init_distributed

    out = tmp_path_factory.mktemp("cpu0")
    config = load_config(CONFIG, _overrides(small_log, out))
    env = init_distributed(device=torch.device("cpu", 0))
    assert env.device == torch.device("cpu", 0)
    return out, config, run_job(config, env)


def test_an_explicit_device_index_trains_evaluates_and_exports_there(reference):
    from torchrec_mtl.inference import export, load_trained
    from torchrec_mtl.run import evaluate_checkpoint

    out, config, results = reference
    _finite_training(results)
    on_index = evaluate_checkpoint(config, device=torch.device("cpu", 0))
    default = evaluate_checkpoint(config)  # the default device: the same figures bit for bit
    for task, values in results["tasks"].items():
        assert on_index[task] == default[task], task
        for metric, value in values.items():
            assert on_index[task][metric] == pytest.approx(value, abs=1e-6), (task, metric)
    trained = load_trained(out / "checkpoints", "cpu:0")
    assert trained.device == torch.device("cpu", 0)
    path = export(trained, out / "export")
    assert json.loads((out / "export" / "manifest.json").read_text())["device"] == "cpu:0"
    dense, sparse = _test_rows(trained, 500)
    with torch.no_grad():
        expected = trained.inference(dense, sparse)
        exported = torch.jit.load(str(path))(dense, sparse)
    saved = np.load(out / "predictions.npz")
    for task, values in expected.items():
        assert torch.equal(exported[task], values), task
        np.testing.assert_allclose(values.numpy(), saved[f"{task}.prediction"][:500], rtol=1e-5, atol=1e-6)


def _test_rows(trained, rows: int):
    from torchrec_mtl.predict import _Encoder

    chunk = b"".join(Path(trained.config.data.dir, "test.tsv").open("rb").readlines()[:rows])
    _, dense, sparse, _ = _Encoder(trained).encode(chunk, 1)
    return torch.from_numpy(dense), torch.from_numpy(sparse)


# measured on the small log (62 steps of 512 rows): bf16 and fp16 moved every headline by at most 0.0013
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_evaluates_predicts_and_exports_near_fp32(reference, small_log, tmp_path, precision,
                                                                         capsys):  # fmt: skip
    from torchrec_mtl.inference import load_trained

    _, _, fp32 = reference
    out = tmp_path / precision
    overrides = [*_overrides(small_log, out), f"training.precision={precision}"]
    assert main(["train", "--config", CONFIG, *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    _finite_training(results)
    assert results["config"]["training"]["precision"] == precision
    for task, value in _headlines(results["tasks"]).items():
        assert value == pytest.approx(_headlines(fp32["tasks"])[task], abs=0.01), task
    # evaluate runs the recorded precision: the training run's own figures
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints"), "--device", "cpu"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert _headlines(evaluation["tasks"]) == pytest.approx(_headlines(results["tasks"]), abs=1e-6)
    # serving is fp32 on the same weights: within autocast's rounding of what training scored
    lines = (small_log / "test.tsv").read_text().splitlines(keepends=True)[:300]
    (tmp_path / "log.tsv").write_text("".join(lines))
    assert main(["predict", "--checkpoint", str(out / "checkpoints"), "--input", str(tmp_path / "log.tsv"),
                 "--out", str(tmp_path / "scores.tsv"), "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    scores = np.loadtxt(tmp_path / "scores.tsv", skiprows=1)
    saved = np.load(out / "predictions.npz")
    for column, task in enumerate(["ctr", "cvr", "rating", "ctcvr"], start=1):
        assert np.isfinite(scores[:, column]).all()
        np.testing.assert_allclose(scores[:, column], saved[f"{task}.prediction"][:300], atol=0.03 if task ==
                                   "rating" else 0.01)  # fmt: skip
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "export")]) == 0
    trained = load_trained(out / "checkpoints")
    dense, sparse = _test_rows(trained, 300)
    with torch.no_grad():
        exported = torch.jit.load(str(tmp_path / "export" / "model.pt"))(dense, sparse)
        expected = trained.inference(dense, sparse)
    for task in expected:
        assert torch.equal(exported[task], expected[task]) and exported[task].dtype == torch.float32, task
    capsys.readouterr()


def _cli(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "torchrec_mtl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_same_path_on_a_gpu(reference, small_log, tmp_path, precision):
    """Train on the GPU (the process group picks it), then evaluate, predict and export with --device cuda."""
    _, _, cpu = reference
    out = tmp_path / precision
    _cli("train", "--config", CONFIG, *_overrides(small_log, out), f"training.precision={precision}")
    results = json.loads((out / "results.json").read_text())
    _finite_training(results)
    for task, value in _headlines(results["tasks"]).items():  # other kernels, other summation orders
        assert value == pytest.approx(_headlines(cpu["tasks"])[task], abs=0.02), task
    _cli("evaluate", "--checkpoint", str(out / "checkpoints"), "--device", "cuda")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert _headlines(evaluation["tasks"]) == pytest.approx(_headlines(results["tasks"]), abs=1e-4)
    lines = (small_log / "test.tsv").read_text().splitlines(keepends=True)[:300]
    (tmp_path / "log.tsv").write_text("".join(lines))
    _cli("predict", "--checkpoint", str(out / "checkpoints"), "--input", str(tmp_path / "log.tsv"), "--out",
         str(tmp_path / "scores.tsv"), "--quiet", "--device", "cuda")  # fmt: skip
    scores = np.loadtxt(tmp_path / "scores.tsv", skiprows=1)
    saved = np.load(out / "predictions.npz")
    np.testing.assert_allclose(scores[:, 1], saved["ctr.prediction"][:300], atol=0.01)
    _cli("export", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "export"), "--device", "cuda")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["device"].startswith("cuda")
    model = torch.jit.load(str(tmp_path / "export" / "model.pt"), map_location="cuda")
    from torchrec_mtl.inference import load_trained

    trained = load_trained(out / "checkpoints", "cuda")
    dense, sparse = _test_rows(trained, 300)
    with torch.no_grad():
        exported = model(dense.cuda(), sparse.cuda())
        expected = trained.inference(dense.cuda(), sparse.cuda())
    for task in expected:
        assert exported[task].is_cuda and torch.allclose(exported[task], expected[task], atol=1e-5), task
