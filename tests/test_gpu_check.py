"""tools/gpu_check.sh: its dry run (the GPU check's steps on the CPU, tiny sizes, this environment) writes every
step's JSON, and without a GPU the real check stops after its first step, saying why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ["env", "train", "evaluate", "predict", "export", "export_int8", "export_check", "train_bf16", "train_fp16",
         "bench"]  # fmt: skip


def _check(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("GPU_CHECK_DRY_RUN", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_the_dry_run_runs_every_step_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "out"
    run = _check("--dry-run", "--work", str(tmp_path / "work"), str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"] and summary["device"] == "cpu"
    assert [step["step"] for step in summary["steps"]] == STEPS
    assert all(step["status"] == "ok" for step in summary["steps"])
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] and env["torch"] == torch.__version__ and not env["fbgemm_gpu"].startswith("not")
    trained = json.loads((out / "train.json").read_text())
    evaluation = json.loads((out / "evaluate.json").read_text())
    for task, values in trained["tasks"].items():
        assert evaluation["tasks"][task]["auc" if "auc" in values else "rmse"] == pytest.approx(
            values["auc" if "auc" in values else "rmse"], abs=1e-6
        ), task
    rows = trained["training"]["rows"]
    predicted = json.loads((out / "predict.json").read_text())
    assert predicted["device"] == "cpu" and predicted["lines"] == predicted["scored"] == rows["test"]
    exported = json.loads((out / "export.json").read_text())
    assert exported["fp32"]["manifest"]["device"] == "cpu" and exported["int8"]["manifest"]["quantized"]
    assert max(exported["fp32"]["max_abs_diff"].values()) == 0.0
    assert 0.0 < max(exported["int8"]["max_abs_diff"].values()) < 0.05
    for precision in ("bf16", "fp16"):
        results = json.loads((out / f"train_{precision}.json").read_text())
        assert results["config"]["training"]["precision"] == precision
        # 31 steps on 4,000 rows: a figure moves by chance (fp16 skips its first steps while the scale settles)
        assert summary["precisions"][precision]["max_abs_diff_from_fp32"] < 0.1
    assert not json.loads((out / "bench.json").read_text())["ran"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted([*(f"{s}.log" for s in STEPS), "steps.tsv"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a CUDA GPU")
def test_without_a_gpu_the_check_stops_after_its_first_step_saying_why(tmp_path):
    run = _check("--python", sys.executable, "--work", str(tmp_path / "work"), str(tmp_path / "out"), timeout=300)
    assert run.returncode == 1
    assert "no CUDA GPU visible" in run.stderr and "nothing else was run" in run.stderr
    (line,) = (tmp_path / "out" / "logs" / "steps.tsv").read_text().splitlines()
    assert line.startswith("env\t1\t") and not (tmp_path / "work" / "run").exists()


def test_the_script_refuses_unknown_options_and_needs_an_out_folder(tmp_path):
    run = _check("--bogus", str(tmp_path))
    assert run.returncode == 2 and "unknown option --bogus" in run.stderr
    run = _check("--dry-run")
    assert run.returncode == 2 and "give the OUT folder" in run.stderr
