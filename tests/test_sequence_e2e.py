"""A model with sequence features end to end through the CLI: DIN over a history and its categories (aligned, their
tables in an EmbeddingCollection) preprocessed, trained (its loss falls), evaluated from its DCP checkpoint to the
same metrics, resumed mid-epoch to the same end, fine-tuned with the tables and the attention frozen (they come out
bit-identical); predict, export and vectors refuse it, naming the sequence feature, until they take sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import torch

from conftest import ONE_PASS
from list_logs import write_list_log
from torchrec_mtl.build import build_model
from torchrec_mtl.cli import EXIT_USER_ERROR, main
from torchrec_mtl.config import config_from_dict, task_set
from torchrec_mtl.finetune import part_of
from torchrec_mtl.schema import ListSpec
from torchrec_mtl.train.checkpoint import load_tensors, read_train_state, resolve_checkpoint

SEQUENCE = ["model.sequence.kind=din", "model.sequence.features=[history, hist_category]"]


@pytest.fixture(scope="module")
def run(small_log, tmp_path_factory):
    data = tmp_path_factory.mktemp("sequence_log")
    schema = write_list_log(small_log, data, categories=True)
    out = tmp_path_factory.mktemp("sequence_run")
    common = [f"data.dir={data}", f"data.schema={schema}", "data.generate=null", "model.text=null", *ONE_PASS,
              "training.batch_size=512", "training.curve_every=10", "training.progress=false", *SEQUENCE]  # fmt: skip
    return data, out, common


def _weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint, read by DCP into the model its config and inputs describe (load_trained
    refuses a sequence model)."""
    path = resolve_checkpoint(checkpoint)
    state = read_train_state(path)
    config, inputs = config_from_dict(state["config"]), state["model_inputs"]
    lists = {name: ListSpec(**spec) for name, spec in inputs["lists"].items()}
    model = build_model(config.model, inputs["num_dense"], inputs["table_sizes"], torch.device("cpu"),
                        task_set(config.objective).tower_tasks, lists=lists)  # fmt: skip
    wanted = {f"model.{key}": value for key, value in model.state_dict().items()}
    load_tensors(path, {"model": wanted}, no_dist=True)
    return {key.removeprefix("model."): value for key, value in wanted.items()}


def test_a_sequence_model_trains_evaluates_and_fine_tunes_through_the_cli(run, capsys):
    data, out, common = run
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", *common, f"out_dir={out}",
                 "checkpoint.every_steps=20", "checkpoint.keep=10"]) == 0
    recorded = read_train_state(resolve_checkpoint(out / "checkpoints"))["model_inputs"]["sequences"]
    assert recorded == {"history": {"kind": "din", "query": "C2", "max_length": 8},
                        "hist_category": {"kind": "din", "query": "C3", "max_length": 8}}  # fmt: skip
    printed = capsys.readouterr().out
    # nine tables: seven bags (C1, C4-C8, tags) and the two the sequences look up (C2, C3), unpooled
    assert "sharded tables on 1 process(es): 9 " in printed

    results = json.loads((out / "results.json").read_text())
    losses = [point["loss"] for point in results["training"]["curve"]]
    assert len(losses) >= 5 and max(losses[-3:]) < 0.8 * losses[0], losses
    assert results["tasks"]["ctr"]["auc"] > 0.6

    assert main(["evaluate", "--checkpoint", str(out / "checkpoints"), "training.progress=false"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["tasks"]["ctr"]["auc"] == pytest.approx(results["tasks"]["ctr"]["auc"], abs=1e-6)

    tuned = out.parent / "sequence_tuned"
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", *common, f"out_dir={tuned}",
                 f"finetune={{checkpoint: {out / 'checkpoints'}, task: ctr, freeze: [embeddings, sequence]}}"]) == 0
    before, after = _weights(out / "checkpoints"), _weights(tuned / "checkpoints")
    frozen = [name for name in before if part_of(name) in ("embeddings", "sequence")]
    assert any(".embedding_collection." in name for name in frozen) and any(n.startswith("interest.") for n in frozen)
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} ({part_of(name)}) changed although frozen"
    assert not all(torch.equal(before[n], after[n]) for n in before if n.startswith("tower.heads.heads.ctr."))


def test_a_sequence_run_resumed_mid_epoch_ends_with_the_uninterrupted_metrics(run, tmp_path):
    """The EmbeddingCollection's tables and their fused optimizer's state come back from the checkpoint."""
    data, out, common = run
    if not (out / "checkpoints" / "step-000000040").exists():
        pytest.skip("needs the trained run of the first test")
    resumed = tmp_path / "resumed"
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", *common, f"out_dir={resumed}",
                 f"checkpoint.resume={out / 'checkpoints' / 'step-000000040'}"]) == 0
    expected = json.loads((out / "results.json").read_text())
    results = json.loads((resumed / "results.json").read_text())
    assert results["tasks"] == expected["tasks"]  # every metric, exactly
    assert results["training"]["steps"] == expected["training"]["steps"]


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "--input", "{data}/test.tsv", "--out", "{tmp}/scores.tsv", "--quiet"],
        ["export", "--out", "{tmp}/export"],
        ["vectors", "--out", "{tmp}/vectors", "--quiet"],
    ],
)
def test_the_one_id_commands_refuse_a_sequence_model_naming_the_feature(run, tmp_path, capsys, command):
    data, out, _ = run
    if not (out / "checkpoints").exists():
        pytest.skip("needs the trained run of the test above")
    args = [part.format(data=data, tmp=tmp_path) for part in command]
    assert main([args[0], "--checkpoint", str(out / "checkpoints"), *args[1:]]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "feature 'history' is a sequence feature" in error and "do not support sequences yet" in error
    assert list(tmp_path.iterdir()) == [], "nothing written"
