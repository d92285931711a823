"""A model with pooled list features, end to end through the CLI: preprocessed, trained (its loss falls), evaluated
from its checkpoint; then served: predict, the exported model.pt and serve.pt score rows with lists of every length
(empty and over-long ones included) as the trained model scores the same rows preprocessed for training, a pruned
export remaps the shared table's rows in the lists too, and the retrieval vectors read the lists of the user's and
the item's last training rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from list_logs import assert_predict_scores, scores_as_trained, write_list_log
from torchrec_mtl.cli import main
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.inference import load_trained
from torchrec_mtl.predict import _Encoder
from torchrec_mtl.pruning import access_counts, choose_rows
from torchrec_mtl.representations import Representations

HISTORY, TAGS = 8, 3  # the max_length of each list (tests/list_logs.py: history keeps its last, tags their first)
RETRIEVAL = ["objective.tasks.match={kind: retrieval, label: click, weight: 0.1}",
             "model.retrieval.user_features=[C1, history]", "model.retrieval.item_features=[C2, tags]"]  # fmt: skip


@pytest.fixture(scope="module")
def run(small_log, tmp_path_factory):
    data = tmp_path_factory.mktemp("list_log")
    schema = write_list_log(small_log, data)
    out = tmp_path_factory.mktemp("list_run")
    common = [f"data.dir={data}", f"data.schema={schema}", "data.generate=null", "model.text=null", *ONE_PASS,
              f"out_dir={out}", "training.batch_size=512", "training.curve_every=10",
              "training.progress=false", *RETRIEVAL]  # fmt: skip
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


def _trained_run(run):
    data, out, _ = run
    if not (out / "checkpoints").exists():
        pytest.skip("needs the trained run of the first test")
    return data, out


def _rows_of_every_length(data, tmp_path):
    """Test lines whose history holds 0 to 12 items (8 kept: the last) and whose tags hold 0 to 5 tokens (3 kept:
    the first), unseen tokens among them, and lines with a bad list element; written as a file."""
    rng = np.random.default_rng(0)
    lines = (data / "test.tsv").read_text().splitlines()[:600]
    items = sorted({line.split("\t")[-9] for line in lines})  # C2, the column the history shares
    rows = []
    for i, line in enumerate(lines):
        fields = line.split("\t")
        history = [str(rng.choice(items)) for _ in range(i % 13)]
        if i % 5 == 1 and history:
            history[0] = "0badcafe"  # unseen: row 0
        tags = [format(int(t), "08x") for t in rng.integers(0, 2**32, i % 6)]
        fields[-2], fields[-1] = "|".join(history), ",".join(tags)
        rows.append("\t".join(fields))
    bad = {600: ("1||2", "list element empty"), 601: ("zz|ab", "list element not hex"),
           602: ("ab,cd", "list element not hex")}  # a wrong separator makes one element that is no token
    for number, (history, _) in bad.items():
        fields = lines[0].split("\t")
        fields[-2] = history
        rows.append("\t".join(fields))
    path = tmp_path / "lists.tsv"
    path.write_text("".join(row + "\n" for row in rows))
    return path, rows, {number + 1: reason for number, (_, reason) in bad.items()}


def test_predict_model_pt_and_serve_pt_score_lists_of_every_length_as_the_trained_model(run, tmp_path):
    data, out = _trained_run(run)
    trained = load_trained(out / "checkpoints")
    path, lines, rejected = _rows_of_every_length(data, tmp_path)
    truth, shards = scores_as_trained(trained, data, path, tmp_path)
    lengths = shards.lists["history"].lengths
    assert set(lengths.tolist()) == set(range(HISTORY + 1))
    assert set(shards.lists["tags"].lengths.tolist()) == set(range(TAGS + 1))

    # predict: the same rows scored (to the 6 digits it writes), the bad ones rejected by preprocessing's reasons
    summary_path = tmp_path / "scores.tsv"
    assert main(["predict", "--checkpoint", str(out / "checkpoints"), "--input", str(path), "--out",
                 str(summary_path), "--quiet"]) == 0  # fmt: skip
    assert_predict_scores(summary_path, len(lines), rejected, truth)

    # model.pt: encoded as predict encodes (the lists cut by their keep rule), the trained model's scores exactly
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["inputs"]["list_lengths"]["columns"] == ["history", "tags"]
    assert manifest["inputs"]["sparse_ids"]["columns"] == [f"C{k}" for k in range(1, 9)]
    model = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    encoded = _Encoder(trained).encode_rows(path.read_bytes(), 1)
    assert [(line, reason) for line, reason, *_ in encoded.rejections] == sorted(rejected.items())
    inputs = encoded.model_inputs(0, len(encoded), torch.device("cpu"))
    assert torch.equal(inputs[3][0], torch.from_numpy(lengths)), "the history's kept lengths are preprocessing's"
    with torch.no_grad():
        exported = model(*inputs)
    for name, values in truth.items():
        np.testing.assert_array_equal(exported[name].numpy(), values, err_msg=name)

    # serve.pt: the raw lines, the same scores; the bad ones not valid, NaN
    serve = torch.jit.load(str(tmp_path / "export" / "serve.pt"))
    served = serve.score_lines([line + "\n" for line in lines], True)
    valid = served["valid"].numpy()
    assert (np.flatnonzero(~valid) + 1).tolist() == sorted(rejected)
    for name, values in truth.items():
        np.testing.assert_array_equal(served[name].numpy()[valid], values, err_msg=name)
        assert np.isnan(served[name].numpy()[~valid]).all()
    assert manifest["serve"]["lists"]["history"]["keep"] == "last"

    # model.pt refuses lists it would misread or that training never gave
    dense, sparse, values, list_lengths = inputs
    too_long = list_lengths.clone()
    too_long[0, 0] = HISTORY + 1
    with pytest.raises(Exception, match="max_length is 8"):
        model(dense, sparse, torch.cat([values, values[:HISTORY + 1 - int(list_lengths[0, 0])]]), too_long)
    with pytest.raises(Exception, match="list_values: .* values; list_lengths sum to"):
        model(dense, sparse, values[:-1], list_lengths)
    with pytest.raises(Exception, match=r"list_lengths: expected shape \[2, "):
        model(dense, sparse, values, list_lengths.t().contiguous())


def test_a_pruned_export_remaps_the_shared_tables_rows_in_the_lists_too(run, tmp_path):
    data, out = _trained_run(run)
    trained = load_trained(out / "checkpoints")
    counts = access_counts(trained)
    training_rows = sum(len(shard) for shard in ShardedLog.open(data / "shards").split("train"))
    assert "history" not in counts and counts["C2"].sum() > training_rows, "the histories count toward C2's table"
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "pruned"),
                 "--prune-rows", "0.5", "--prune-scope", "table"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert set(manifest["pruned"]["rows"]["tables"]) == {*(f"C{k}" for k in range(1, 9)), "tags"}
    kept = choose_rows(counts, 0.5, "table")
    path, _, _ = _rows_of_every_length(data, tmp_path)
    encoded = _Encoder(trained).encode_rows(path.read_bytes(), 1)
    dense, sparse, values, lengths = encoded.model_inputs(0, len(encoded), torch.device("cpu"))
    # the unpruned model on the rows with every pruned row sent to row 0: the single IDs by their table, the
    # history's items by the item table's kept rows, the tags by their own
    gone = {f: ~np.isin(np.arange(len(c)), kept[f]) for f, c in counts.items()}
    sparse_zeroed = sparse.clone()
    for column, feature in enumerate(trained.inference.single_features):
        sparse_zeroed[:, column][torch.from_numpy(gone[feature][sparse[:, column].numpy()])] = 0
    history_values = int(lengths[0].sum())
    list_owner = np.repeat(["C2", "tags"], [history_values, len(values) - history_values])
    values_zeroed = values.clone()
    for owner in ("C2", "tags"):
        mine = np.flatnonzero(list_owner == owner)
        values_zeroed[torch.from_numpy(mine[gone[owner][values.numpy()[mine]]])] = 0
    assert (values_zeroed != values).any() and (sparse_zeroed[:, 1] != sparse[:, 1]).any()
    pruned = torch.jit.load(str(tmp_path / "pruned" / "model.pt"))
    with torch.no_grad():
        expected = trained.inference(dense, sparse_zeroed, values_zeroed, lengths)
        got = pruned(dense, sparse, values, lengths)
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_vectors_read_the_lists_of_each_users_and_items_last_training_row(run, tmp_path):
    data, out = _trained_run(run)
    assert main(["vectors", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    vectors = Representations.load(tmp_path / "v")
    assert vectors.manifest["users"]["features"] == ["C1", "history"]
    assert vectors.manifest["items"]["features"] == ["C2", "tags"]
    trained = load_trained(out / "checkpoints")
    train = EncodedLog.concat(ShardedLog.open(data / "shards").split("train"))
    features = trained.inputs["features"]

    def towers(rows: np.ndarray, side: int) -> np.ndarray:
        """The tower's vectors of these training rows as the training loader batches them (every feature there;
        each tower reads only its own)."""
        (batch,) = BatchLoader(train.take(rows), features, len(rows), shuffle=False, pad_tail=True)
        with torch.no_grad():
            return trained.inference.model.retrieval_vectors(batch.sparse_features)[side].numpy()

    users = np.array([np.flatnonzero(train.keys["C1"] == key)[-1] for key in vectors.users.keys])
    assert train.lists["history"].lengths[users].max() > 0, "users with a history"
    np.testing.assert_allclose(vectors.users.vectors, towers(users, 0), rtol=1e-5, atol=1e-6)
    seen = vectors.items_seen
    items = np.array([np.flatnonzero(train.keys["C2"] == key)[-1] for key in vectors.items.keys[seen]])
    assert train.lists["tags"].lengths[items].min() >= 2, "every item row has its tags"
    np.testing.assert_allclose(vectors.items.vectors[seen], towers(items, 1), rtol=1e-5, atol=1e-6)


def test_an_int8_export_of_a_list_model_scores_within_int8s_tolerance(run, tmp_path):
    data, out = _trained_run(run)
    trained = load_trained(out / "checkpoints")
    checkpoint = str(out / "checkpoints")
    assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "int8"), "--quantize"]) == 0
    path, lines, _ = _rows_of_every_length(data, tmp_path)
    encoded = _Encoder(trained).encode_rows(path.read_bytes(), 1)
    inputs = encoded.model_inputs(0, len(encoded), torch.device("cpu"))
    with torch.no_grad():
        expected, got = trained.inference(*inputs), torch.jit.load(str(tmp_path / "int8" / "model.pt"))(*inputs)
    served = torch.jit.load(str(tmp_path / "int8" / "serve.pt")).score_lines([line + "\n" for line in lines], True)
    for name, kind in trained.task_kinds.items():
        # measured here: 2e-4 on the probabilities, 2e-3 on the rating, 1.2e-3 on the retrieval score (a dot
        # product of two towers over int8 rows)
        tolerance = {"regression": 0.01, "retrieval": 3e-3}.get(kind, 1e-3)
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=tolerance, err_msg=name)
        np.testing.assert_array_equal(served[name].numpy()[served["valid"].numpy()], got[name].numpy())
