"""Checkpoints: a resumed run ends where an uninterrupted one does, after a stop, SIGTERM or SIGKILL; half-written,
corrupt and foreign checkpoints are never used; a checkpoint moves between world sizes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from conftest import ONE_PASS, free_port
from torchrec_mtl.config import load_config
from torchrec_mtl.run import run_job
from torchrec_mtl.train.checkpoint import TRAIN_STATE, Checkpointer, CheckpointError, read_train_state

ROOT = Path(__file__).resolve().parents[1]


def _overrides(log: Path, out: Path, *extra: str) -> list:
    return [
        f"data.dir={log}",
        "data.generate=null", *ONE_PASS,
        f"out_dir={out}",
        "model.text=null",
        "training.batch_size=256",
        "training.eval_batch_size=2048",
        "training.epochs=2",
        "training.curve_every=30",
        "training.progress=false",
        *extra,
    ]


def _run(log: Path, out: Path, *extra: str) -> dict:
    return run_job(load_config("configs/mmoe_synthetic.yaml", _overrides(log, out, *extra)))


def _same_outcome(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["tasks"] == uninterrupted["tasks"]  # every metric, exactly
    assert resumed["segments"] == uninterrupted["segments"]
    for key in ("steps", "epoch_losses"):
        assert resumed["training"][key] == uninterrupted["training"][key], key
    strip = lambda curve: [{k: v for k, v in point.items() if k != "gates"} for point in curve]  # noqa: E731
    assert strip(resumed["training"]["curve"]) == strip(uninterrupted["training"]["curve"])


@pytest.fixture(scope="module")
def uninterrupted(small_log, tmp_path_factory):
    """Two epochs (250 steps), a checkpoint every 40 steps, all kept."""
    out = tmp_path_factory.mktemp("uninterrupted")
    results = _run(small_log, out, "checkpoint.every_steps=40", "checkpoint.keep=10", "checkpoint.resume=never")
    return out, results


def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_metrics(small_log, uninterrupted, tmp_path):
    out, expected = uninterrupted
    steps = [read_train_state(p)["step"] for p in Checkpointer(out / "checkpoints").complete()]
    assert steps == [40, 80, 120, 160, 200, 240, 250]  # every 40 steps, and the finished run's last
    assert read_train_state(out / "checkpoints" / "step-000000250")["finished"]
    # step 160 is batch 35 of epoch 2: the data position, both optimizers, the curve window (a point at 180 spans
    # the resume) and the random streams must all come back for the rest to be the same
    state = read_train_state(out / "checkpoints" / "step-000000160")
    assert (state["summary"]["epoch"], state["summary"]["batch"]) == (1, 35)
    resumed = _run(small_log, tmp_path, f"checkpoint.resume={out / 'checkpoints' / 'step-000000160'}")
    _same_outcome(resumed, expected)


def test_checkpoints_are_found_only_when_complete_and_old_ones_are_pruned(uninterrupted, tmp_path):
    out, _ = uninterrupted
    folder = tmp_path / "checkpoints"
    for step in (40, 80, 120):
        shutil.copytree(out / "checkpoints" / f"step-{step:09d}", folder / f"step-{step:09d}")
    (folder / ".step-000000200.partial").mkdir()  # a write that died: never a candidate
    (folder / "step-000000300").mkdir()  # no train_state.json: the rename happens only after it is written
    assert Checkpointer(folder).latest() == folder / "step-000000120"
    assert [p.name for p in Checkpointer(folder).complete()] == [f"step-{s:09d}" for s in (40, 80, 120)]


def test_a_corrupt_or_foreign_checkpoint_is_refused_with_its_name(small_log, uninterrupted, tmp_path):
    out, _ = uninterrupted
    source = out / "checkpoints" / "step-000000080"
    broken = tmp_path / "broken" / "step-000000080"
    shutil.copytree(source, broken)
    data = next(p for p in broken.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=str(broken)):
        _run(small_log, tmp_path / "a", f"checkpoint.resume={broken}")
    (broken / TRAIN_STATE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{broken / TRAIN_STATE}: not a readable train state"):
        _run(small_log, tmp_path / "b", f"checkpoint.resume={broken}")
    with pytest.raises(CheckpointError, match=r"written by another config \(model.tower.num_experts \(4 -> 3\)"):
        _run(small_log, tmp_path / "c", f"checkpoint.resume={source}", "model.tower.num_experts=3")


def _cli(log: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torchrec_mtl.cli", "train", "--config", "configs/mmoe_synthetic.yaml"]
    return subprocess.Popen(
        command + _overrides(log, out, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def _folder(folder: Path, train_state: dict) -> Path:
    return folder / f"step-{train_state['step']:09d}"


def test_a_run_stopped_by_sigterm_then_killed_by_sigkill_ends_like_the_uninterrupted_one(
    small_log, uninterrupted, tmp_path
):
    _, expected = uninterrupted
    folder = tmp_path / "checkpoints"
    latest = lambda: read_train_state(Checkpointer(folder).latest())  # noqa: E731

    # SIGTERM: a checkpoint at the next step, then exit code 143
    process = _cli(small_log, tmp_path, "checkpoint.every_steps=40")
    _wait_for(lambda: any(read_train_state(p)["step"] >= 40 for p in Checkpointer(folder).complete()), process,
              "a checkpoint")  # fmt: skip
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=600)
    stopped = latest()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert f"stopped by SIGTERM after step {stopped['step']}" in output and not stopped["finished"]

    # the same command continues from there (checkpoint.resume=auto); SIGKILL leaves only the periodic checkpoints
    process = _cli(small_log, tmp_path, "checkpoint.every_steps=40")
    _wait_for(lambda: latest()["step"] > stopped["step"], process, "a checkpoint after the resume")
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    killed = latest()
    assert process.returncode == -signal.SIGKILL
    assert f"resuming from {_folder(folder, stopped)}: step {stopped['step']}" in output
    assert killed["step"] % 40 == 0 and stopped["step"] < killed["step"] < 250 and not killed["finished"]
    assert not (tmp_path / "results.json").exists(), "the run finished before it was killed; make it longer"

    # and once more to the end: the same metrics as the run never interrupted
    process = _cli(small_log, tmp_path, "checkpoint.every_steps=40")
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    assert f"resuming from {_folder(folder, killed)}: step {killed['step']}" in output
    _same_outcome(json.loads((tmp_path / "results.json").read_text()), expected)


def _restore_and_evaluate(log: Path, out: Path, checkpoints: list, sharding: str) -> list:
    """Each checkpoint's step and test metrics, restored into one model prepared at this world size."""
    from torchrec_mtl.run import prepare_job
    from torchrec_mtl.train.distributed import init_distributed
    from torchrec_mtl.train.loop import evaluate
    from torchrec_mtl.train.resume import restore_run

    config = load_config("configs/mmoe_synthetic.yaml", _overrides(log, out, sharding))
    env = init_distributed()
    job = prepare_job(config, env)
    scores = []
    for checkpoint in checkpoints:
        summary, _, _ = restore_run(checkpoint, job.sharded, job.optimizer, config.training.batch_size * env.world_size)
        metrics = evaluate(job.sharded, job.eval_pipeline, job.loader("test"), job.tasks.names, False)
        scores.append({"step": summary.steps, "tasks": metrics})
    return scores


def _at_world_size_2(rank: int, world_size: int, port: int, log: str, out: str, written_at_1: str) -> None:
    """Train at world size 2 (row-wise, a checkpoint every 50 steps), then score its step-100 checkpoint and the
    world-size-1 one."""
    from dist_workers import _join

    _join(rank, world_size, port)
    log, out = Path(log), Path(out)
    _run(log, out, "training.sharding_types=[row_wise]", "checkpoint.every_steps=50")
    checkpoints = [out / "checkpoints" / "step-000000100", Path(written_at_1)]
    scores = _restore_and_evaluate(log, out, checkpoints, "training.sharding_types=[row_wise]")
    if rank == 0:
        (out / "scores.json").write_text(json.dumps(scores))


def test_a_checkpoint_written_at_one_world_size_loads_at_another(small_log, uninterrupted, tmp_path):
    """The model a checkpoint holds scores the test set the same at world sizes 1 and 2, whichever wrote it."""
    out, _ = uninterrupted  # world size 1: 125 steps an epoch
    written_at_1 = out / "checkpoints" / "step-000000200"
    written_at_2 = tmp_path / "ws2"  # world size 2: 62 steps of 2 x 256 rows an epoch
    mp.spawn(_at_world_size_2, args=(2, free_port(), str(small_log), str(written_at_2), str(written_at_1)), nprocs=2)
    at_2 = json.loads((written_at_2 / "scores.json").read_text())
    checkpoints = [written_at_2 / "checkpoints" / "step-000000100", written_at_1]
    at_1 = _restore_and_evaluate(small_log, tmp_path / "ws1", checkpoints, "training.sharding_types=[table_wise]")
    assert [s["step"] for s in at_1] == [s["step"] for s in at_2] == [100, 200]
    for one, two in zip(at_1, at_2):
        for task, values in one["tasks"].items():
            for metric, value in values.items():
                assert two["tasks"][task][metric] == pytest.approx(value, abs=1e-5), (one["step"], task, metric)
        assert one["tasks"]["ctr"]["auc"] > 0.6
    # and training goes on in one process from the same share of the epoch: step 100 at world size 2 is batch 38 of
    # 62 in epoch 2 (19,456 rows), batch 76 of 125 at world size 1, so 49 steps remain
    resumed = _run(small_log, tmp_path / "resumed", f"checkpoint.resume={checkpoints[0]}")
    assert resumed["training"]["steps"] == 100 + 49 and resumed["tasks"]["ctr"]["auc"] > 0.6
