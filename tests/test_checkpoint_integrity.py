"""Checkpoints run no code and refuse corruption: every file is checked against the checkpoint's manifest before
anything in it is read, a pickle planted as a rank file or as DCP's metadata creates nothing even when the manifest
is forged to match, and non-finite weights are refused. Each refusal reaches the CLI as one line naming the file,
exit code 2, no traceback, for evaluate, predict, export, vectors and resume alike."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from torchrec_mtl.cli import main
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.train.checkpoint import (
    MANIFEST,
    TRAIN_STATE,
    Checkpointer,
    CheckpointError,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_manifest,
)

CONFIG = "configs/mmoe_synthetic.yaml"
# a tower weight of the MMoE model (the ctr head's output layer), and an embedding table (a ShardedTensor when the
# sharded model loads it)
TOWER_WEIGHT = "model.tower.heads.heads.ctr.1.weight"
TABLE = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_C2.weight"


def _overrides(log: Path, out: Path, *extra: str) -> List[str]:
    return [f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null", "training.batch_size=256",
            "training.eval_batch_size=2048", "training.curve_every=5", "training.progress=false",
            "training.print_plan=false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3,000-row log and one epoch on it (9 steps, a few seconds): checkpoints at steps 4, 8 and 9 (the end)."""
    root = tmp_path_factory.mktemp("integrity")
    log = root / "log"
    generate(SyntheticConfig(num_rows=3000, num_users=100, num_items=60, num_brands=10, num_sessions=200, seed=5), log)
    out = root / "run"
    every_4_steps = _overrides(log, out, "checkpoint.every_steps=4", "checkpoint.keep=10")
    assert main(["train", "--config", CONFIG, *every_4_steps]) == 0
    return log, out


def _copy(run, tmp_path: Path, step: int = 9) -> Path:
    """A copy of the run's checkpoint at ``step``, in a checkpoints folder of its own."""
    _, out = run
    folder = tmp_path / "checkpoints" / f"step-{step:09d}"
    shutil.copytree(out / "checkpoints" / folder.name, folder)
    return folder


def _flip_a_byte(file: Path) -> None:
    """One byte changed: in JSON a digit of the step number (so it still parses), elsewhere the middle byte."""
    data = bytearray(file.read_bytes())
    position = data.index(b'"step": ') + len(b'"step": ') if file.name == TRAIN_STATE else len(data) // 2
    data[position] ^= 0x01  # a digit stays a digit: '9' -> '8'
    file.write_bytes(bytes(data))


def _refusal(capsys, code: int) -> str:
    """The CLI's refusal: exit code 2 and one line on stderr, no traceback."""
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchrec-mtl: "), error
    return lines[0]


def _every_command_refuses(run, folder: Path, tmp_path: Path, capsys, *expected: str) -> None:
    """evaluate, predict, export, resume (CLI) and the vector export each refuse ``folder`` with ``expected`` in the
    message."""
    from torchrec_mtl.representations import export_representations

    log, _ = run
    commands = {
        "evaluate": ["evaluate", "--config", CONFIG, "--checkpoint", str(folder), *_overrides(log, tmp_path / "e")],
        "predict": ["predict", "--checkpoint", str(folder), "--input", str(log / "test.tsv"),
                    "--out", str(tmp_path / "scores.tsv"), "--quiet"],  # fmt: skip
        "export": ["export", "--checkpoint", str(folder), "--out", str(tmp_path / "export")],
        "resume": ["train", "--config", CONFIG, *_overrides(log, tmp_path / "r", f"checkpoint.resume={folder}")],
    }
    for name, argv in commands.items():
        message = _refusal(capsys, main(argv))
        for part in (str(folder), *expected):
            assert part in message, (name, message)
    assert not (tmp_path / "scores.tsv").exists() and not (tmp_path / "export" / "model.pt").exists()
    assert not (tmp_path / "r" / "results.json").exists()
    with pytest.raises(CheckpointError) as refused:
        export_representations(folder, tmp_path / "vectors", progress=False)
    assert all(part in str(refused.value) for part in (str(folder), *expected)), refused.value
    assert not (tmp_path / "vectors").exists()


class _Marker:
    """A pickle that, when unpickled without restriction, creates ``path`` (as planted code would run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_every_checkpoint_lists_its_other_files_and_its_rank_files_load_weights_only(run):
    _, out = run
    folders = Checkpointer(out / "checkpoints", keep=10).complete()
    assert [f.name for f in folders] == ["step-000000004", "step-000000008", "step-000000009"]
    for folder in folders:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert sorted(manifest["files"]) == [f for f in files if f != MANIFEST]
        assert {".metadata", "rank-0.pt", TRAIN_STATE} <= set(manifest["files"])
        assert any(name.endswith(".distcp") for name in manifest["files"])
        verify_checkpoint(folder)
        rank_state = torch.load(folder / "rank-0.pt", weights_only=True)  # tensors and plain values only
        assert set(rank_state["rng"]) == {"torch", "numpy", "python"}
    # step 4 lies inside the first curve window (every 5 steps): its batches travel with the checkpoint
    window = torch.load(folders[0] / "rank-0.pt", weights_only=True)["window"]
    assert len(window) == 4
    assert all(isinstance(value, torch.Tensor) for batch in window for part in batch for value in part.values())


def test_the_random_streams_come_back_after_a_weights_only_round_trip(tmp_path):
    saved = tmp_path / "rng.pt"
    torch.save(rng_state(), saved)
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    set_rng_state(torch.load(saved, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2:] == again[2:]


@pytest.mark.parametrize("kind", ["distcp", "metadata", "rank", "train_state"])
def test_one_flipped_byte_in_any_file_is_refused_by_every_command(run, tmp_path, capsys, kind):
    folder = _copy(run, tmp_path)
    file = {
        "distcp": next(folder.glob("*.distcp"), None),
        "metadata": folder / ".metadata",
        "rank": folder / "rank-0.pt",
        "train_state": folder / TRAIN_STATE,
    }[kind]
    _flip_a_byte(file)
    _every_command_refuses(run, folder, tmp_path, capsys, f"{file.name}: checksum mismatch")


def test_a_pickle_planted_as_a_rank_file_runs_nothing_even_with_a_forged_manifest(run, tmp_path, capsys):
    log, _ = run
    folder = _copy(run, tmp_path, step=4)  # unfinished, at the world size that resumes it: its rank file is read
    marker = tmp_path / "planted-code-ran"
    torch.save(_Marker(marker), folder / "rank-0.pt")
    resume = ["train", "--config", CONFIG, *_overrides(log, tmp_path / "r", f"checkpoint.resume={folder}")]
    assert "rank-0.pt: size mismatch" in _refusal(capsys, main(resume))
    write_manifest(folder)  # the manifest forged to match: the checksums pass, weights_only still refuses the pickle
    verify_checkpoint(folder)
    message = _refusal(capsys, main(resume))
    assert f"{folder / 'rank-0.pt'}: cannot be read (refused by torch.load(weights_only=True): " in message
    assert not marker.exists()


def test_a_pickle_planted_as_dcp_metadata_runs_nothing_even_with_a_forged_manifest(run, tmp_path, capsys):
    log, _ = run
    folder = _copy(run, tmp_path)
    marker = tmp_path / "planted-code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    predict = ["predict", "--checkpoint", str(folder), "--input", str(log / "test.tsv"),
               "--out", str(tmp_path / "scores.tsv"), "--quiet"]  # fmt: skip
    assert ".metadata: size mismatch" in _refusal(capsys, main(predict))
    write_manifest(folder)
    assert f"checkpoint {folder}: .metadata: refused" in _refusal(capsys, main(predict))
    evaluate = ["evaluate", "--config", CONFIG, "--checkpoint", str(folder), *_overrides(log, tmp_path / "e")]
    assert f"checkpoint {folder}: .metadata: refused" in _refusal(capsys, main(evaluate))
    assert not marker.exists()


def test_an_unlisted_a_missing_file_or_no_manifest_is_refused(run, tmp_path, capsys):
    log, _ = run
    folder = _copy(run, tmp_path)
    predict = ["predict", "--checkpoint", str(folder), "--input", str(log / "test.tsv"),
               "--out", str(tmp_path / "scores.tsv"), "--quiet"]  # fmt: skip
    (folder / "extra").mkdir()
    (folder / "extra" / "weights.pt").write_bytes(b"planted")
    assert "extra/weights.pt: not listed in the manifest" in _refusal(capsys, main(predict))
    shutil.rmtree(folder / "extra")
    main(predict)  # intact again
    assert capsys.readouterr() and (tmp_path / "scores.tsv").exists()
    (folder / "rank-0.pt").unlink()
    assert "rank-0.pt: missing" in _refusal(capsys, main(predict))
    (folder / MANIFEST).unlink()
    assert f"checkpoint {folder}: no manifest.json: written by an older version or tampered with" in _refusal(
        capsys, main(predict)
    )
    (folder / MANIFEST).write_text('{"format": 1, "files": {"../../etc/passwd": {"size": 1, "sha256": "00"}}}')
    assert "manifest.json: not a valid manifest" in _refusal(capsys, main(predict))


def _rewrite_with(folder: Path, tmp_path: Path, name: str, value: float) -> None:
    """The checkpoint's tensors written again with ``value`` in one element of parameter ``name``, and the manifest
    re-hashed: only the finiteness check stands between it and NaN predictions."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = tmp_path / "whole.pt"
    dcp_to_torch_save(folder, whole)
    state = torch.load(whole, weights_only=True)
    state["model"][name][0, 1] = value
    for file in [folder / ".metadata", *folder.glob("*.distcp")]:
        file.unlink()
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    write_manifest(folder)


@pytest.mark.parametrize("name, value", [(TOWER_WEIGHT, float("nan")), (TABLE, float("inf"))])
def test_a_non_finite_weight_with_a_matching_manifest_is_refused(run, tmp_path, capsys, name, value):
    folder = _copy(run, tmp_path)
    _rewrite_with(folder, tmp_path, name, value)
    verify_checkpoint(folder)  # the checksums pass
    _every_command_refuses(run, folder, tmp_path, capsys, f"non-finite values in {name}")


def test_an_intact_checkpoint_predicts_and_resumes(run, tmp_path, capsys):
    log, out = run
    folder = _copy(run, tmp_path, step=4)
    predict = ["predict", "--checkpoint", str(folder), "--input", str(log / "test.tsv"),
               "--out", str(tmp_path / "scores.tsv"), "--quiet"]  # fmt: skip
    assert main(predict) == 0
    assert len((tmp_path / "scores.tsv").read_text().splitlines()) == 601  # a header and the 600 test rows
    # resumed at step 4 (its RNG states and curve window back from the weights-only rank file), the run ends as the
    # uninterrupted one did
    assert main(["train", "--config", CONFIG, *_overrides(log, tmp_path / "r", f"checkpoint.resume={folder}")]) == 0
    resumed = json.loads((tmp_path / "r" / "results.json").read_text())
    uninterrupted = json.loads((out / "results.json").read_text())
    assert resumed["tasks"] == uninterrupted["tasks"]
    assert resumed["training"]["steps"] == uninterrupted["training"]["steps"] == 9
    assert os.path.isfile(tmp_path / "r" / "checkpoints" / "step-000000009" / MANIFEST)


def _two_ranks_load_a_changed_file(rank: int, world_size: int, port: int, folder: str) -> None:
    """Save a small state at world size 2, change a file only rank 1 hashes (the ranks share the hashing), load:
    every rank must refuse with the same message, none may wait for the other."""
    from dist_workers import _join
    from torchrec_mtl.train.distributed import init_distributed

    _join(rank, world_size, port)
    init_distributed(timeout_s=60)  # a rank left waiting fails the test within a minute instead of hanging it
    checkpointer = Checkpointer(folder)
    path = checkpointer.save(1, {"model": {"w": torch.ones(4), "v": torch.arange(3.0)}}, {})
    if rank == 0:
        listed = sorted(json.loads((path / MANIFEST).read_text())["files"].items())
        changed = next(name for index, (name, entry) in enumerate(listed) if index % 2 == 1 and entry["size"] > 0)
        _flip_a_byte(path / changed)
    torch.distributed.barrier()
    try:
        checkpointer.load(path, {"model": {"w": torch.zeros(4), "v": torch.zeros(3)}})
        message = "loaded"
    except CheckpointError as error:
        message = str(error)
    (Path(folder) / f"refusal-{rank}.txt").write_text(message)


def test_every_rank_refuses_what_one_rank_found(tmp_path):
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(_two_ranks_load_a_changed_file, args=(2, free_port(), str(tmp_path)), nprocs=2)
    refusals = [(tmp_path / f"refusal-{rank}.txt").read_text() for rank in (0, 1)]
    assert refusals[0] == refusals[1] and "checksum mismatch" in refusals[0], refusals
