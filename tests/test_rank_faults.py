"""Faults across processes: a non-finite loss on one rank stops every rank together with one message; a periodic
checkpoint that fails is tried once more, and a second failure stops training naming the last good checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from conftest import ONE_PASS, free_port
from dist_workers import checkpoint_blocked_at, non_finite_loss_on_one_rank
from torchrec_mtl.config import load_config
from torchrec_mtl.run import prepare_job
from torchrec_mtl.train.checkpoint import Checkpointer, CheckpointError
from torchrec_mtl.train.distributed import init_distributed
from torchrec_mtl.train.loop import train
from torchrec_mtl.train.resume import CheckpointTrigger, save_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mmoe_synthetic.yaml")


def _overrides(log: Path, out: Path, *extra: str) -> list:
    return [f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null", "training.progress=false",
            "checkpoint.resume=never", *extra]  # fmt: skip


def _two_ranks(worker, *args) -> list:
    """Run ``worker(rank, 2, port, *args)`` in two spawned processes; what each wrote to ``rank-<r>.json``."""
    context = mp.start_processes(worker, args=(2, free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 400  # start-up included; a bound under test is measured by the test
    while not context.join(timeout=2):  # raises (and ends the other) if a worker raised
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks still ran 400 s after they started")
    assert [process.exitcode for process in context.processes] == [0, 0]
    out = Path(args[2])
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_a_non_finite_loss_on_one_rank_stops_both_ranks_with_the_same_message(small_log, tmp_path):
    # rank 1's third batch has an infinite rating label: its loss at step 3 is not finite, rank 0's is finite
    overrides = _overrides(small_log, tmp_path, "training.batch_size=256", "training.collective_timeout_s=300")
    outcomes = _two_ranks(non_finite_loss_on_one_rank, CONFIG, overrides, str(tmp_path), 1, 2)
    poisoned_at = float((tmp_path / "poisoned_at").read_text())
    assert max(o["ended_at"] for o in outcomes) - poisoned_at < 60
    assert [o["type"] for o in outcomes] == ["NonFiniteLoss", "NonFiniteLoss"], outcomes
    assert outcomes[0]["message"] == outcomes[1]["message"]
    message = outcomes[0]["message"]
    assert message.startswith("step 3 (epoch 1): the loss is "), message
    assert " on rank 1 of 2; not finite: rating (" in message, message
    assert "Training stopped on every rank before any checkpoint of this state was written" in message


class _UnblockAfterFirstFailure:
    """``save`` (a checkpoint writer); its first CheckpointError removes ``blocker`` (a fault that clears)."""

    def __init__(self, save, blocker: Path) -> None:
        self.save, self.blocker, self.calls, self.failures = save, blocker, [], 0

    def __call__(self, summary, window):
        self.calls.append(summary.steps)
        try:
            return self.save(summary, window)
        except CheckpointError:
            self.failures += 1
            if self.failures == 1:
                self.blocker.unlink()
            raise


def _blocked_run(small_log, tmp_path, blocked_step: int, clears: bool, with_checkpointer: bool):
    """Train one epoch (15 steps of 2,048 rows), a checkpoint every 2 steps, where a file stands in the place of
    step ``blocked_step``'s partial folder (a real mkdir failure), removed after the first failure when ``clears``."""
    config = load_config(CONFIG, _overrides(small_log, tmp_path, "training.batch_size=2048"))
    job = prepare_job(config, init_distributed())
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.directory.mkdir(parents=True)
    blocker = checkpointer.directory / f".step-{blocked_step:09d}.partial"
    blocker.write_text("not a folder")
    loader = job.loader("train")
    rows = loader.batch_size * loader.world_size
    def real(summary, window):
        return save_run(checkpointer, job.sharded, job.optimizer, summary, window, rows, {})

    save = _UnblockAfterFirstFailure(real, blocker) if clears else real
    trigger = CheckpointTrigger(save, every_steps=2, handle_sigterm=False, retry_after_s=0.0,
                                checkpointer=checkpointer if with_checkpointer else None)  # fmt: skip
    run = lambda: train(job.sharded, job.pipeline, loader, 1, show_progress=False, after_step=trigger)  # noqa: E731
    return run, checkpointer, save, trigger


def test_a_checkpoint_that_fails_once_is_written_on_the_second_try_and_training_goes_on(small_log, tmp_path, capsys):
    run, checkpointer, save, trigger = _blocked_run(small_log, tmp_path, 4, clears=True, with_checkpointer=False)
    summary = run()
    assert summary.steps == 15 and not summary.stopped
    assert save.calls == [2, 4, 4, 6, 8, 10, 12, 14] and save.failures == 1
    assert [p.name for p in checkpointer.complete()] == ["step-000000012", "step-000000014"]
    assert trigger.last_path == checkpointer.directory / "step-000000014"
    printed = capsys.readouterr().out
    blocked = checkpointer.directory / ".step-000000004.partial"
    warning = f"warning: checkpoint step-000000004 failed ([Errno 17] File exists: '{blocked}'); trying once more"
    assert warning in printed


@pytest.mark.parametrize("with_checkpointer", [True, False], ids=["newest-complete", "last-written"])
def test_a_checkpoint_that_fails_twice_stops_training_naming_the_last_good_one(small_log, tmp_path, with_checkpointer):
    run, checkpointer, _, _ = _blocked_run(small_log, tmp_path, 6, clears=False, with_checkpointer=with_checkpointer)
    with pytest.raises(CheckpointError) as raised:
        run()
    good = checkpointer.directory / "step-000000004"
    assert str(raised.value) == (
        f"checkpoint step-000000006 failed twice ([Errno 17] File exists: "
        f"'{checkpointer.directory / '.step-000000006.partial'}'); the last good checkpoint is {good}"
    )
    assert checkpointer.latest() == good


def test_a_checkpoint_that_fails_twice_at_world_size_2_stops_both_ranks_with_the_same_message(small_log, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    blocker = checkpoints / ".step-000000004.partial"  # rank 0 creates the partial folder: only it sees the fault
    blocker.write_text("not a folder")
    overrides = _overrides(small_log, tmp_path, "training.batch_size=1024", "training.collective_timeout_s=300")
    outcomes = _two_ranks(checkpoint_blocked_at, CONFIG, overrides, str(tmp_path), 4)
    assert [o["type"] for o in outcomes] == ["CheckpointError", "CheckpointError"], outcomes
    assert outcomes[0]["message"] == outcomes[1]["message"] == (
        f"checkpoint step-000000004 failed twice ([Errno 17] File exists: '{blocker}'); the last good checkpoint is "
        f"{checkpoints / 'step-000000002'}"
    )
