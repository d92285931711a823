"""A model with pooled list features, end to end through the CLI: preprocessed, trained (its loss falls), evaluated
from its checkpoint; predict, export and vectors refuse it, naming the list, until they take lists."""

from __future__ import annotations

import json

import pytest

from conftest import ONE_PASS
from list_logs import write_list_log
from torchrec_mtl.cli import EXIT_USER_ERROR, main


@pytest.fixture(scope="module")
def run(small_log, tmp_path_factory):
    data = tmp_path_factory.mktemp("list_log")
    schema = write_list_log(small_log, data)
    out = tmp_path_factory.mktemp("list_run")
    common = [f"data.dir={data}", f"data.schema={schema}", "data.generate=null", "model.text=null", *ONE_PASS,
              f"out_dir={out}", "training.batch_size=512", "training.curve_every=10",
              "training.progress=false"]  # fmt: skip
    return data, out, common


def test_a_model_with_pooled_lists_trains_and_evaluates_through_the_cli(run, capsys):
    data, out, common = run
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", *common]) == 0
    printed = capsys.readouterr().out
    # ten features, nine tables: the history looks up the item table (C2), the tags a table of their own
    assert "history 191, tags 1,000" in printed and "sharded tables on 1 process(es): 9 " in printed

    metadata = json.loads((data / "shards" / "metadata.json").read_text())
    assert metadata["counts"]["truncated_lists"]["history"] > 0, "histories of up to 12 items, 8 kept"
    assert metadata["counts"]["truncated_lists"]["tags"] == 0
    assert metadata["table_sizes"]["history"] == metadata["table_sizes"]["C2"]

    results = json.loads((out / "results.json").read_text())
    losses = [point["loss"] for point in results["training"]["curve"]]
    assert len(losses) >= 5 and max(losses[-3:]) < 0.8 * losses[0], losses
    assert results["tasks"]["ctr"]["auc"] > 0.6

    assert main(["evaluate", "--checkpoint", str(out / "checkpoints"), "training.progress=false"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["tasks"]["ctr"]["auc"] == pytest.approx(results["tasks"]["ctr"]["auc"], abs=1e-6)


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "--input", "{data}/test.tsv", "--out", "{tmp}/scores.tsv", "--quiet"],
        ["export", "--out", "{tmp}/export"],
        ["vectors", "--out", "{tmp}/vectors", "--quiet"],
    ],
)
def test_the_one_id_commands_refuse_a_list_model_naming_the_list(run, tmp_path, capsys, command):
    data, out, _ = run
    if not (out / "checkpoints").exists():
        pytest.skip("needs the trained run of the test above")
    args = [part.format(data=data, tmp=tmp_path) for part in command]
    assert main([args[0], "--checkpoint", str(out / "checkpoints"), *args[1:]]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "feature 'history' is a list column" in error and "do not support list features yet" in error
    assert list(tmp_path.iterdir()) == [], "nothing written"
