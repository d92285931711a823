"""Pruned exports of a trained run (item text on), loaded in a process that imports only torch and fbgemm_gpu: with
rows pruned, model.pt scores a row that uses no pruned row exactly as the unpruned model does, and every row as the
unpruned model scores it with the pruned rows' IDs sent to row 0; serve.pt agrees on the raw lines; the manifest
records what went; int8 tables combine with pruning; dense pruning leaves plain weights with zeros that only
compression turns into bytes saved."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from torchrec_mtl.cli import main
from torchrec_mtl.data.prepare import shards_dir
from torchrec_mtl.data.shards import ShardedLog
from torchrec_mtl.inference import load_trained
from torchrec_mtl.predict import _Encoder

LINES = 3000  # test lines scored: enough for rows with and without a pruned ID at 50%


@pytest.fixture(scope="module")
def run(small_log, tiny_bert_dir, tmp_path_factory):
    """A small MMoE with item text trained on the 40,000-row log, and its first test lines encoded for model.pt."""
    out = tmp_path_factory.mktemp("pruning_run")
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", f"data.dir={small_log}", "data.generate=null", *ONE_PASS,
                 f"out_dir={out}", f"model.text.encoder={tiny_bert_dir}", "model.text.cache=item_text_tiny.npz",
                 "training.batch_size=256", "training.progress=false"]) == 0  # fmt: skip
    trained = load_trained(out / "checkpoints")
    lines = (small_log / "test.tsv").read_text().splitlines(keepends=True)[:LINES]
    _, dense, sparse, _ = _Encoder(trained).encode("".join(lines).encode(), 1)
    return trained, out, lines, dense, sparse


def _export(checkpoint: Path, folder: Path, *options: str) -> dict:
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder), *options]) == 0
    return json.loads((folder / "manifest.json").read_text())


def _load_in_a_bare_process(folder: Path, dense: np.ndarray, sparse: np.ndarray, lines) -> Dict[str, np.ndarray]:
    """model.pt on (dense, sparse) and serve.pt on the raw lines, where only torch and fbgemm_gpu are imported; also
    each parameter of model.pt of two or more dimensions (``param/<name>``): the tables, the linear weights and the
    expert banks' stacked weights (and their biases, [experts, out]) as stored."""
    np.save(folder / "dense.npy", dense)
    np.save(folder / "sparse.npy", sparse)
    (folder / "lines.json").write_text(json.dumps(lines))
    script = f"""
import json, sys, numpy as np, torch, fbgemm_gpu
folder = {str(folder)!r}
model, serve = torch.jit.load(folder + "/model.pt"), torch.jit.load(folder + "/serve.pt")
out = {{"model/" + k: v.numpy() for k, v in model(torch.from_numpy(np.load(folder + "/dense.npy")),
                                                 torch.from_numpy(np.load(folder + "/sparse.npy"))).items()}}
served = serve.score_lines(json.load(open(folder + "/lines.json")), True)
out.update({{"serve/" + k: v.numpy() for k, v in served.items()}})
out.update({{"param/" + n: p.detach().numpy() for n, p in model.named_parameters() if p.dim() >= 2}})
assert not [m for m in sys.modules if m.split(".")[0] in ("torchrec", "torchrec_mtl")], "imported more than torch"
np.savez(folder + "/scored.npz", **out)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(folder / "scored.npz"))


def _unpruned(trained, dense: np.ndarray, sparse: np.ndarray) -> Dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in trained.inference(torch.from_numpy(dense), torch.from_numpy(sparse)).items()}


def _training_counts(trained) -> Dict[str, np.ndarray]:
    """Lookups per row in the training split, counted here from the shards (not by the code under test)."""
    log = ShardedLog.open(shards_dir(trained.config.data))
    sparse = np.concatenate([np.asarray(shard.sparse) for shard in log.split("train")])
    return {f: np.bincount(sparse[:, c], minlength=log.table_sizes[f]) for c, f in enumerate(log.categorical_features)}


def test_a_row_pruned_export_loads_with_torch_alone_and_matches_the_unpruned_model_on_rows_using_no_pruned_row(
    run, tmp_path
):
    trained, out, lines, dense, sparse = run
    manifest = _export(out / "checkpoints", tmp_path / "export", "--prune-rows", "0.5")
    scored = _load_in_a_bare_process(tmp_path / "export", dense, sparse, lines)
    report = manifest["pruned"]["rows"]
    assert (report["share"], report["by"], report["scope"], report["pruned_ids_go_to_row"]) == (0.5, "count", "all", 0)
    assert manifest["pruned"]["dense"] is None and manifest["quantized"] is False
    tables, counts = report["tables"], _training_counts(trained)
    assert {f: t["rows"] for f, t in tables.items()} == trained.inputs["table_sizes"]
    assert sum(t["pruned"] for t in tables.values()) == int(0.5 * sum(t["rows"] for t in tables.values()))
    # the artifact's ID tables hold the kept rows alone (the item-text table is not pruned)
    stored = {name.split(".")[-2]: value.shape for name, value in scored.items()
              if ".sparse_arch.embedding_bag_collection." in name}  # fmt: skip
    text = trained.inference.model.item_text.embedding_bag_collection.embedding_bags["t_item_text"].weight
    assert scored["param/model.model.item_text.embedding_bag_collection.embedding_bags.t_item_text.weight"].shape == (
        tuple(text.shape))
    assert stored == {f"t_{f}": (t["kept"], trained.config.model.embedding_dim) for f, t in tables.items()}
    # which rows went in each table: its least used (ties: the lower row number first; row 0 stays), and across
    # tables no kept row was used less than a pruned one
    features = trained.inputs["features"]
    remapped, untouched = sparse.copy(), np.ones(len(sparse), dtype=bool)
    pruned_counts, kept_counts = [], []
    for feature, table in tables.items():
        gone = np.sort(np.argsort(counts[feature][1:], kind="stable")[: table["pruned"]] + 1)
        pruned_counts.append(counts[feature][gone])
        kept_counts.append(np.delete(counts[feature], [0, *gone]))
        hit = np.isin(sparse[:, features.index(feature)], gone)
        remapped[hit, features.index(feature)] = 0
        untouched &= ~hit
        share = counts[feature][gone].sum() / counts[feature].sum()
        assert table["accesses_pruned"] == pytest.approx(share, abs=1e-6), feature
    assert np.concatenate(pruned_counts).max() <= np.concatenate(kept_counts).min()
    assert 0 < untouched.sum() < len(sparse), "rows with and without a pruned ID"
    unpruned, as_row_0 = _unpruned(trained, dense, sparse), _unpruned(trained, dense, remapped)
    for task in trained.task_kinds:
        got = scored[f"model/{task}"]
        np.testing.assert_allclose(got[untouched], unpruned[task][untouched], rtol=0, atol=1e-6, err_msg=task)
        np.testing.assert_allclose(got, as_row_0[task], rtol=0, atol=1e-6, err_msg=task)
        assert np.abs(got[~untouched] - unpruned[task][~untouched]).max() > 0, task  # pruning did change those
        np.testing.assert_allclose(scored[f"serve/{task}"], got, rtol=1e-6, atol=1e-6, err_msg=task)
    assert scored["serve/valid"].all()


def test_norm_pruning_of_each_table_combines_with_int8_tables(run, tmp_path):
    trained, out, lines, dense, sparse = run
    manifest = _export(out / "checkpoints", tmp_path / "export", "--prune-rows", "0.9", "--prune-by", "norm",
                       "--prune-scope", "table", "--quantize")  # fmt: skip
    assert manifest["quantized"] is True and manifest["pruned"]["rows"]["by"] == "norm"
    scored = _load_in_a_bare_process(tmp_path / "export", dense, sparse, lines)
    collection = trained.inference.model.sparse_arch.embedding_bag_collection
    features, remapped = trained.inputs["features"], sparse.copy()
    for feature, table in manifest["pruned"]["rows"]["tables"].items():
        assert table["pruned"] == min(int(0.9 * table["rows"] + 1e-9), table["rows"] - 1), feature
        assert "accesses_pruned" not in table  # counted only when pruning by count
        norms = collection.embedding_bags[f"t_{feature}"].weight.detach().norm(dim=1).numpy()
        gone = np.sort(np.argsort(norms[1:], kind="stable")[: table["pruned"]] + 1)  # the smallest norms, row 0 stays
        column = features.index(feature)
        remapped[np.isin(sparse[:, column], gone), column] = 0
    as_row_0 = _unpruned(trained, dense, remapped)
    for task in trained.task_kinds:  # int8 tables: within their error (test_cli_stages.py measured 4e-4 and 3e-3)
        assert np.abs(scored[f"model/{task}"] - as_row_0[task]).max() <= 0.01, task
        np.testing.assert_allclose(scored[f"serve/{task}"], scored[f"model/{task}"], rtol=1e-6, atol=1e-6)


def test_dense_pruning_leaves_plain_weights_whose_zeros_only_compression_saves(run, tmp_path):
    trained, out, lines, dense, sparse = run
    plain = _export(out / "checkpoints", tmp_path / "plain")
    assert plain["pruned"] is None  # off by default
    manifest = _export(out / "checkpoints", tmp_path / "dense", "--prune-dense", "0.5")
    report = manifest["pruned"]["dense"]
    assert manifest["pruned"]["rows"] is None and report["share"] == 0.5
    scored = _load_in_a_bare_process(tmp_path / "dense", dense, sparse, lines)
    assert not [name for name in scored if "_orig" in name or "_mask" in name]  # prune.remove folded the masks
    tower = {}  # every linear layer's weight: an expert bank's stacked weights are one layer per expert
    for name, value in scored.items():
        if not (name.startswith("param/") and ".tower." in name) or ".experts.biases." in name:
            continue
        tower.update({f"{name}[{e}]": layer for e, layer in enumerate(value)} if value.ndim == 3 else {name: value})
    assert len(tower) == report["layers"] and sum(v.size for v in tower.values()) == report["weights"]
    for name, weight in tower.items():
        assert (weight == 0).sum() == round(0.5 * weight.size), name
    assert sum(int((v == 0).sum()) for v in tower.values()) == report["zeros"]
    others = [v for name, v in scored.items() if name.startswith("param/") and ".tower." not in name]
    assert others and all((v != 0).mean() > 0.9 for v in others)  # the dense arch and tables are not pruned
    unpruned = _unpruned(trained, dense, sparse)
    for task in trained.task_kinds:
        assert np.isfinite(scored[f"model/{task}"]).all() and scored["serve/valid"].all()
        np.testing.assert_allclose(scored[f"serve/{task}"], scored[f"model/{task}"], rtol=1e-6, atol=1e-6)
        assert not np.array_equal(scored[f"model/{task}"], unpruned[task]), task
    sizes = {name: (tmp_path / name / "model.pt").read_bytes() for name in ("plain", "dense")}
    # the same floats stored: no smaller as written (1% for the code around them), smaller once compressed
    assert abs(len(sizes["dense"]) - len(sizes["plain"])) < 0.01 * len(sizes["plain"])
    assert len(gzip.compress(sizes["dense"])) < 0.95 * len(gzip.compress(sizes["plain"]))
