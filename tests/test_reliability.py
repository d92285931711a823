"""Faults mid-run: a non-finite loss, a disk that fills while a checkpoint is written, a rank that dies. (Killed and
resumed runs, half-written and corrupt checkpoints: tests/test_checkpoint.py; hostile input: test_properties.py,
test_preprocess.py; corrupt shards and text caches: test_preprocess.py, test_text.py.)"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ONE_PASS, free_port
from torchrec_mtl.cli import main
from torchrec_mtl.config import load_config
from torchrec_mtl.run import prepare_job
from torchrec_mtl.train.checkpoint import Checkpointer, CheckpointError, read_train_state
from torchrec_mtl.train.distributed import init_distributed
from torchrec_mtl.train.loop import TrainSummary
from torchrec_mtl.train.resume import restore_run, save_run

ROOT = Path(__file__).resolve().parents[1]


def _overrides(log: Path, out: Path, *extra: str) -> list:
    return [f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null", "training.batch_size=256",
            "training.progress=false", "checkpoint.resume=never", *extra]  # fmt: skip


def test_a_non_finite_loss_stops_training_naming_the_step_and_term_and_keeps_the_last_good_checkpoint(
    small_log, tmp_path, capsys
):
    # plain SGD at rate 20 on the dense parameters diverges within a few steps (seeded: at step 5, in the rating term)
    code = main(["train", "--config", "configs/mmoe_synthetic.yaml",
                 *_overrides(small_log, tmp_path, "training.dense_optimizer=sgd", "training.dense_lr=20",
                             "checkpoint.every_steps=2")])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert "step 5 (epoch 1): the loss is nan; not finite: rating (nan)" in error
    latest = Checkpointer(tmp_path / "checkpoints").latest()
    assert f"the last good checkpoint: {latest}" in error
    state = read_train_state(latest)
    assert state["step"] == 4 and math.isfinite(state["summary"]["epoch_loss"])
    assert not (tmp_path / "results.json").exists()


def test_a_disk_that_fills_during_a_checkpoint_leaves_the_previous_one_intact(small_log, tmp_path):
    config = load_config("configs/mmoe_synthetic.yaml", _overrides(small_log, tmp_path))
    job = prepare_job(config, init_distributed())
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    save = lambda steps: save_run(checkpointer, job.sharded, job.optimizer, TrainSummary(steps=steps), None, 256, {})  # noqa: E731
    first = save(1)
    # The OS refuses any write past 64 KiB (EFBIG, as a full disk refuses with ENOSPC); the soft limit goes back up.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(CheckpointError, match=r"step-000000002: not written \(.+\); earlier checkpoints are intact"):
            save(2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert checkpointer.complete() == [first]
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == [first.name]  # the partial folder is gone
    summary, _, _ = restore_run(first, job.sharded, job.optimizer, 256)
    assert summary.steps == 1


def test_when_a_rank_dies_the_others_exit_with_an_error_within_seconds(small_log, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "torchrec_mtl.cli", "train", "--config", "configs/mmoe_synthetic.yaml",
               *_overrides(small_log, tmp_path, "training.epochs=3", "training.collective_timeout_s=120")]  # fmt: skip
    ranks = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))  # fmt: skip
        ranks.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    printed = ""
    while "sharded tables on" not in printed:  # rank 0 prints the plan's line just before training starts
        line = ranks[0].stdout.readline()
        if not line and ranks[0].poll() is not None:  # rank 1's own words say why it never joined
            ranks[1].kill()
            rank_1 = ranks[1].communicate()[0][-3000:]
            raise AssertionError(f"rank 0 ended before training:\n{printed}\nrank 1:\n{rank_1}")
        printed += line
    time.sleep(3)
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        output, _ = ranks[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        raise AssertionError("rank 0 still runs 120 s after rank 1 died")
    assert ranks[0].returncode not in (0, None)
    assert time.monotonic() - killed < 60, "rank 0 noticed the dead peer only at the collective timeout"
    assert "Connection" in output or "peer" in output, output[-2000:]
    assert not (tmp_path / "results.json").exists()
