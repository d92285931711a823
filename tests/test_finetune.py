"""Fine-tuning one task from a joint checkpoint: the frozen parts come out bit-identical, the task's head moves, and
every task's metrics are reported before and after."""

from __future__ import annotations

import pytest
import torch

from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.finetune import part_of
from torchrec_mtl.inference import load_trained
from torchrec_mtl.run import run_job
from conftest import ONE_PASS


def _run(log, out, *extra):
    return run_job(load_config("configs/mmoe_synthetic.yaml", [
        f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null", "training.batch_size=256",
        "training.progress=false", "checkpoint.resume=never", *extra]))  # fmt: skip


def test_finetuning_one_task_keeps_the_frozen_parts_and_reports_before_and_after(small_log, tmp_path):
    joint = _run(small_log, tmp_path / "joint")
    tuned = _run(small_log, tmp_path / "ctr", f"finetune={{checkpoint: {tmp_path / 'joint' / 'checkpoints'}, task: ctr, "
                 "freeze: [embeddings, experts, gates]}")  # fmt: skip
    report = tuned["finetune"]
    assert report["task"] == "ctr" and report["freeze"] == ["embeddings", "experts", "gates"]
    for task, values in joint["tasks"].items():  # before: the joint model itself
        assert report["before"][task]["auc" if "auc" in values else "rmse"] == pytest.approx(
            values["auc" if "auc" in values else "rmse"], abs=1e-6
        )
    assert report["after"] == tuned["tasks"] and set(report["after"]) == {"ctr", "cvr", "rating", "ctcvr"}

    before = load_trained(tmp_path / "joint" / "checkpoints").inference.model.state_dict()
    after = load_trained(tmp_path / "ctr" / "checkpoints").inference.model.state_dict()
    same = {name: torch.equal(before[name], after[name]) for name in before}
    for name, equal in same.items():
        if part_of(name) in ("embeddings", "experts", "gates"):
            assert equal, f"{name} ({part_of(name)}) changed although frozen"
    assert not all(same[n] for n in same if n.startswith("tower.heads.heads.ctr.")), "the CTR head did not train"
    assert not all(same[n] for n in same if n.startswith("dense_arch.")), "the dense arch is not frozen: it trains"
    # the other tasks' heads get no gradient: their losses have weight 0
    assert all(same[n] for n in same if n.startswith("tower.heads.heads.rating."))


def test_a_finetune_section_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"finetune.task: 'like'; allowed: ctr, cvr, rating, ctcvr"):
        load_config("configs/mmoe_synthetic.yaml", [f"finetune={{checkpoint: {tmp_path}, task: like}}"])
    with pytest.raises(ConfigError, match=r"finetune.freeze\[0\]: 'towers'; allowed: embeddings"):
        load_config("configs/mmoe_synthetic.yaml", [f"finetune={{checkpoint: {tmp_path}, task: ctr, freeze: [towers]}}"])
