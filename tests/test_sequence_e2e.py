"""A model with sequence features end to end through the CLI: DIN over a history and its categories (aligned, their
tables in an EmbeddingCollection) preprocessed, trained (its loss falls), evaluated from its DCP checkpoint to the
same metrics, resumed mid-epoch to the same end, fine-tuned with the tables and the attention frozen (they come out
bit-identical). Then served: a tiny DIN and a tiny BST on the synthetic history profile (configs/din_history.yaml)
score rows with histories of every length (empty and over-long ones included) through predict, model.pt and
serve.pt as through the training path, bad histories rejected by reason; the int8 and pruned exports stay within
their tolerance of the float model, and the retrieval vectors, which read no history, are the towers' own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from list_logs import assert_predict_scores, scores_as_trained, write_list_log
from torchrec_mtl.build import build_model
from torchrec_mtl.cli import main
from torchrec_mtl.config import config_from_dict, task_set
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.embedding_tables import table_owner
from torchrec_mtl.finetune import part_of
from torchrec_mtl.inference import load_trained
from torchrec_mtl.predict import SEQUENCE_LENGTHS_DIFFER, _Encoder
from torchrec_mtl.pruning import access_counts, choose_rows
from torchrec_mtl.representations import Representations
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
    """The model weights of a checkpoint, read by DCP into the model its config and inputs describe."""
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


# --- served: DIN and BST on the synthetic history profile ----------------------------------------------------------

HISTORY = 20  # configs/datasets/synthetic_history.yaml: hist_item and hist_category keep their last 20
GENERATE = "{profile: history, num_rows: 6000, num_users: 100, num_items: 80, num_brands: 10, click_rate: 0.1}"
RETRIEVAL = ["objective.tasks.match={kind: retrieval, label: click, weight: 0.1}",
             "model.retrieval.user_features=[C1, C4]", "model.retrieval.item_features=[C2, C6]"]  # fmt: skip


@pytest.fixture(scope="module")
def history_data(tmp_path_factory) -> Path:
    """The tiny history log's folder: generated by the first run that trains on it, reused by the next."""
    return tmp_path_factory.mktemp("history_log")


@pytest.fixture(scope="module", params=["din", "bst"])
def history_run(request, history_data, tmp_path_factory) -> Tuple[Path, Path]:
    """configs/din_history.yaml at a tiny size, with model.sequence.kind din or bst and a retrieval task, trained
    through the CLI: (data folder, run folder)."""
    out = tmp_path_factory.mktemp(f"history_{request.param}")
    assert main(["train", "--config", "configs/din_history.yaml", f"data.dir={history_data}",
                 f"data.generate={GENERATE}", "model.text=null", *ONE_PASS, "training.batch_size=256",
                 "training.progress=false", f"model.sequence.kind={request.param}", *RETRIEVAL,
                 f"out_dir={out}"]) == 0  # fmt: skip
    return history_data, out


def _histories_of_every_length(data: Path, tmp_path: Path) -> Tuple[Path, Path, List[str], Dict[int, str]]:
    """Test lines whose aligned histories (hist_item, and hist_category its items' categories) hold 0 to 25 items
    (the last 20 kept), unseen items among them; then a line of each bad history (an empty element, an element that
    is no hex token, and two histories of different lengths) and one whose histories differ only beyond what is kept
    (valid: both keep 20). Written twice: every line (``lines.tsv``), and all but the misaligned one, which
    preprocessing accepts and the model refuses (``aligned.tsv``, for the training path)."""
    rng = np.random.default_rng(0)
    lines = (data / "test.tsv").read_text().splitlines()[: 12 * (HISTORY + 6)]
    pairs = sorted({tuple(line.split("\t")[-9:-7]) for line in lines})  # (C2, C3): an item and its category
    rows = []
    for i, line in enumerate(lines):
        fields = line.split("\t")
        history = [pairs[k] for k in rng.integers(0, len(pairs), i % (HISTORY + 6))]
        if i % 5 == 1 and history:
            history[-1] = ("0badcafe", history[-1][1])  # an unseen item: row 0, kept (the last)
        fields[-2], fields[-1] = "|".join(item for item, _ in history), "|".join(category for _, category in history)
        rows.append("\t".join(fields))

    def line_with(items: List[str], categories: List[str]) -> str:
        fields = lines[0].split("\t")
        fields[-2], fields[-1] = "|".join(items), "|".join(categories)
        return "\t".join(fields)

    items, categories = [p[0] for p in pairs], [p[1] for p in pairs]
    bad = {len(rows) + 1: "list element empty", len(rows) + 2: "list element not hex"}
    rows += [line_with([items[0], "", items[1]], categories[:3]), line_with(items[:2], [categories[0], "zz"])]
    rows.append(line_with((items * 2)[:HISTORY + 5], (categories * 2)[:HISTORY + 2]))  # both keep their last 20
    aligned = tmp_path / "aligned.tsv"
    aligned.write_text("".join(row + "\n" for row in rows))
    bad[len(rows) + 1] = SEQUENCE_LENGTHS_DIFFER
    rows.append(line_with(items[:3], categories[:2]))
    path = tmp_path / "lines.tsv"
    path.write_text("".join(row + "\n" for row in rows))
    return path, aligned, rows, bad


def test_predict_model_pt_and_serve_pt_score_histories_of_every_length_as_the_trained_model(
    history_run, tmp_path, capsys
):
    data, out = history_run
    trained = load_trained(out / "checkpoints")
    assert trained.sequences == ["hist_item", "hist_category"]
    path, aligned, lines, rejected = _histories_of_every_length(data, tmp_path)
    truth, shards = scores_as_trained(trained, data, aligned, tmp_path)
    lengths = shards.lists["hist_item"].lengths
    assert set(lengths.tolist()) == set(range(HISTORY + 1))
    assert np.array_equal(shards.lists["hist_category"].lengths, lengths)

    # predict: the same rows scored (to the 6 digits it writes), the bad ones rejected and counted by reason
    scores_path = tmp_path / "scores.tsv"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out / "checkpoints"), "--input", str(path), "--out",
                 str(scores_path), "--quiet"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["reasons"] == {"list element empty": 1, "list element not hex": 1, SEQUENCE_LENGTHS_DIFFER: 1}
    assert summary["scored"] == len(lines) - 3
    assert_predict_scores(scores_path, len(lines), rejected, truth)

    # model.pt: encoded as predict encodes (the histories cut to their last 20), the trained model's scores exactly
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["inputs"]["list_lengths"]["columns"] == manifest["inputs"]["sequence_features"] == trained.sequences
    assert manifest["inputs"]["sparse_ids"]["columns"] == [f"C{k}" for k in range(1, 9)]
    model = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    encoded = _Encoder(trained).encode_rows(path.read_bytes(), 1)
    assert [(line, reason) for line, reason, *_ in encoded.rejections] == sorted(rejected.items())
    inputs = encoded.model_inputs(0, len(encoded), torch.device("cpu"))
    assert torch.equal(inputs[3], torch.from_numpy(np.stack([lengths, lengths]))), "preprocessing's kept lengths"
    with torch.no_grad():
        exported = model(*inputs)
    for name, values in truth.items():
        np.testing.assert_array_equal(exported[name].numpy(), values, err_msg=name)

    # serve.pt: the raw lines, the same scores (bitwise in predict's batch, the accepted lines; with the bad lines
    # in the batch too, to float32 rounding: the attention's kernels may round a last bit differently), the bad ones
    # not valid, NaN
    serve = torch.jit.load(str(tmp_path / "export" / "serve.pt"))
    accepted = serve.score_lines([line + "\n" for n, line in enumerate(lines, 1) if n not in rejected], True)
    served = serve.score_lines([line + "\n" for line in lines], True)
    valid = served["valid"].numpy()
    assert accepted["valid"].all() and (np.flatnonzero(~valid) + 1).tolist() == sorted(rejected)
    for name, values in truth.items():
        np.testing.assert_array_equal(accepted[name].numpy(), values, err_msg=name)
        np.testing.assert_allclose(served[name].numpy()[valid], values, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.isnan(served[name].numpy()[~valid]).all()
    assert manifest["serve"]["lists"]["hist_item"]["keep"] == "last"
    assert "aligned position by position" in manifest["serve"]["lists"]["hist_category"]["attended"]

    # model.pt refuses histories training never gave: of different lengths in a row, or longer than 20
    dense, sparse = inputs[0][:1], inputs[1][:1]
    ids = torch.ones(2 * (HISTORY + 1), dtype=torch.int64)
    with pytest.raises(Exception, match="aligned position by position"):
        model(dense, sparse, ids[:5], torch.tensor([[3], [2]], dtype=torch.int32))
    with pytest.raises(Exception, match=f"max_length is {HISTORY}"):
        model(dense, sparse, ids, torch.tensor([[HISTORY + 1], [HISTORY + 1]], dtype=torch.int32))


def test_int8_and_pruned_exports_of_a_sequence_model_score_within_their_tolerance(history_run, tmp_path):
    """int8 quantizes the EmbeddingCollection's tables too; pruning removes rows of them, the histories' IDs remapped
    as the column they share."""
    data, out = history_run
    trained = load_trained(out / "checkpoints")
    checkpoint = str(out / "checkpoints")
    path, _, lines, rejected = _histories_of_every_length(data, tmp_path)
    accepted = [line + "\n" for n, line in enumerate(lines, 1) if n not in rejected]
    dense, sparse, values, lengths = _Encoder(trained).encode_rows(path.read_bytes(), 1).model_inputs(
        0, len(accepted), torch.device("cpu")
    )
    with torch.no_grad():
        expected = trained.inference(dense, sparse, values, lengths)

    assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "int8"), "--quantize"]) == 0
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["quantized"] is True
    got = torch.jit.load(str(tmp_path / "int8" / "model.pt"))(dense, sparse, values, lengths)
    served = torch.jit.load(str(tmp_path / "int8" / "serve.pt")).score_lines(accepted, True)
    for name, kind in trained.task_kinds.items():
        # measured here (DIN, BST): 2.3e-4 on the probabilities, 3.4e-4 on the rating, 1.5e-3 on the retrieval score
        tolerance = {"regression": 0.01, "retrieval": 3e-3}.get(kind, 1e-3)
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=tolerance, err_msg=name)
        assert not torch.equal(got[name], expected[name]), f"{name}: int8 tables round somewhere"
        np.testing.assert_array_equal(served[name].numpy(), got[name].numpy(), err_msg=name)

    assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "pruned"), "--prune-rows", "0.5",
                 "--prune-scope", "table"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    tables = manifest["pruned"]["rows"]["tables"]
    assert set(tables) == {f"C{k}" for k in range(1, 9)} and tables["C2"]["pruned"] > 0 and tables["C3"]["pruned"] > 0
    counts = access_counts(trained)
    kept = choose_rows(counts, 0.5, "table")
    # the unpruned model on the rows with every pruned row sent to row 0: the single IDs by their table, each
    # history's IDs by the table of the column it shares (C2's and C3's, in the EmbeddingCollection)
    gone = {owner: ~np.isin(np.arange(len(count)), kept[owner]) for owner, count in counts.items()}
    sparse_zeroed = sparse.clone()
    for column, feature in enumerate(trained.inference.single_features):
        sparse_zeroed[:, column][torch.from_numpy(gone[feature][sparse[:, column].numpy()])] = 0
    values_zeroed, start = values.clone(), 0
    for index, feature in enumerate(trained.inference.list_features):
        end = start + int(lengths[index].sum())
        part = values_zeroed[start:end]
        part[torch.from_numpy(gone[table_owner(feature, trained.lists)][part.numpy()])] = 0
        start = end
    assert (values_zeroed != values).any() and (sparse_zeroed[:, 1] != sparse[:, 1]).any()
    with torch.no_grad():
        expected = trained.inference(dense, sparse_zeroed, values_zeroed, lengths)
        got = torch.jit.load(str(tmp_path / "pruned" / "model.pt"))(dense, sparse, values, lengths)
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_the_vectors_of_a_sequence_model_are_its_towers_which_read_no_history(history_run, tmp_path):
    """The two towers read non-sequence features only (a config naming a sequence feature there is refused), so a
    user's vector is the user tower's on the user's last training row, whatever its history."""
    data, out = history_run
    assert main(["vectors", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    vectors = Representations.load(tmp_path / "v")
    assert vectors.manifest["users"]["features"] == ["C1", "C4"]
    trained = load_trained(out / "checkpoints")
    train = EncodedLog.concat(ShardedLog.open(data / "shards").split("train"))

    def towers(rows: np.ndarray, side: int) -> np.ndarray:
        """The tower's vectors of these training rows as the training loader batches them, histories included."""
        (batch,) = BatchLoader(train.take(rows), trained.inputs["features"], len(rows), shuffle=False, pad_tail=True)
        with torch.no_grad():
            return trained.inference.model.retrieval_vectors(batch.sparse_features)[side].numpy()

    users = np.array([np.flatnonzero(train.keys["C1"] == key)[-1] for key in vectors.users.keys])
    assert train.lists["hist_item"].lengths[users].max() > 0, "users whose last row has a history"
    np.testing.assert_allclose(vectors.users.vectors, towers(users, 0), rtol=1e-5, atol=1e-6)
    seen = vectors.items_seen
    items = np.array([np.flatnonzero(train.keys["C2"] == key)[-1] for key in vectors.items.keys[seen]])
    np.testing.assert_allclose(vectors.items.vectors[seen], towers(items, 1), rtol=1e-5, atol=1e-6)
