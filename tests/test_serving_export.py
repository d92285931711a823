"""The exported serve.pt end to end, loaded in a process that imports only torch and fbgemm_gpu: on 10,000 raw
lines of a generated log (item text on, min_count vocabularies) its scores are predict's bit for bit, the lines
predict rejects are not valid, and the quantized export's serve.pt loads and scores alike within int8's error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import ONE_PASS
from torchrec_mtl.cli import main
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.inference import load_trained
from torchrec_mtl.predict import predict_lines

TASKS = ["ctr", "cvr", "rating", "ctcvr"]
LABELS = 3  # click, conversion, rating: the first columns of the synthetic layout


@pytest.fixture(scope="module")
def run(tiny_bert_dir, tmp_path_factory):
    """A tiny MMoE with item text trained for a few steps on a generated log of 12,000 rows, and 10,000 of its
    lines (train and test) in one file."""
    data = tmp_path_factory.mktemp("serving_log")
    generate(SyntheticConfig(num_rows=12_000, num_users=150, num_items=80, num_brands=20, num_sessions=300, seed=7),
             data)  # fmt: skip
    out = tmp_path_factory.mktemp("serving_run")
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", f"data.dir={data}", "data.generate=null", *ONE_PASS,
                 f"out_dir={out}", f"model.text.encoder={tiny_bert_dir}", "model.text.cache=item_text_tiny.npz",
                 "training.batch_size=512", "training.progress=false"]) == 0  # fmt: skip
    lines = [*(data / "test.tsv").open().readlines(), *(data / "train.tsv").open().readlines()][:10_000]
    log = out / "raw.tsv"
    log.write_text("".join(lines))
    return load_trained(out / "checkpoints"), out, lines


def _predict(trained, log: Path):
    """predict's scored line numbers (1-based) and each task's float32 scores, in line order."""
    numbers, scores = [], {task: [] for task in TASKS}
    for lines, outputs, _ in predict_lines(trained, log):
        numbers.append(lines)
        for task in TASKS:
            scores[task].append(outputs[task])
    return np.concatenate(numbers), {task: np.concatenate(values) for task, values in scores.items()}


def _serve_in_a_bare_process(artifact: Path, calls: Dict[str, dict], folder: Path) -> Dict[str, np.ndarray]:
    """Load ``artifact`` where only torch and fbgemm_gpu are imported and make ``calls`` (name -> {"lines": [...],
    "labelled": bool} or {"rows": [...]}); each call's outputs come back as ``name/output`` arrays."""
    (folder / "calls.json").write_text(json.dumps(calls))
    script = f"""
import json, sys, numpy as np, torch, fbgemm_gpu
serve = torch.jit.load({str(artifact)!r})
results = {{}}
for name, call in json.loads(open({str(folder / 'calls.json')!r}).read()).items():
    outputs = serve.score_lines(call["lines"], call["labelled"]) if "lines" in call else serve(call["rows"])
    results.update({{f"{{name}}/{{key}}": value.numpy() for key, value in outputs.items()}})
assert not [m for m in sys.modules if m.split(".")[0] in ("torchrec", "torchrec_mtl")], "imported more than torch"
np.savez({str(folder / 'served.npz')!r}, **results)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(folder / "served.npz"))


def _export(checkpoint: Path, folder: Path, quantize: bool) -> dict:
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder)]
                + (["--quantize"] if quantize else [])) == 0  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == [".torchrec-mtl.json", "manifest.json", "model.pt", "serve.pt"]
    return json.loads((folder / "manifest.json").read_text())


def _hostile(lines: List[str]) -> List[str]:
    """Well-formed lines with one field made bad (or good in a way one might doubt), and lines of a bad shape."""
    out = []
    for i, (column, value) in enumerate([
        (3, "1.5"), (3, " 5"), (4, "5 "), (5, "+7"), (6, "007"), (7, "-3"), (8, "9223372036854775808"), (9, "x"),
        (16, "zz"), (16, "+1f"), (17, "-1f"), (17, "-0"), (18, "0x1f"), (19, "1F"), (20, " 1f"), (21, "\u00e9"),
        (22, "ffffffffffffffff"), (23, "7fffffffffffffff"), (0, "yes"), (0, "2"), (1, "1.0"), (2, "inf"), (2, "1e39"),
        (2, "4.5"), (0, ""), (2, "nan"),
    ]):  # fmt: skip
        fields = lines[i].rstrip("\n").split("\t")
        fields[column] = value
        out.append("\t".join(fields) + "\n")
    fields = lines[30].rstrip("\n").split("\t")
    return out + ["\t".join(fields[:-1]) + "\n", "\t".join([*fields, ""]) + "\n", "\n", "\t".join(fields) + "\r\n",
                  "\t".join(fields[LABELS:]) + "\n"]  # fmt: skip


@pytest.fixture(scope="module")
def served(run, tmp_path_factory):
    """The fp32 export's serve.pt, called in a bare process on the 10,000 lines (in predict's batches, whole lines
    and feature rows) and on hostile lines."""
    trained, out, lines = run
    folder = tmp_path_factory.mktemp("serving_export")
    manifest = _export(out / "checkpoints", folder / "export", quantize=False)
    columns = manifest["serve"]["columns"]
    rows = [line.rstrip("\n").split("\t")[LABELS:] for line in lines]
    assert columns == manifest["serve"]["unlabelled_layout"], "the synthetic schema ignores no column"
    hostile = _hostile(lines)
    (folder / "hostile.tsv").write_text("".join(hostile))
    calls = {
        "first": {"lines": lines[:8192], "labelled": True},  # predict's batches: 8,192 rows, then the rest
        "rest": {"lines": lines[8192:], "labelled": True},
        "rows": {"rows": rows[:8192]},
        "hostile": {"lines": hostile, "labelled": True},
        "empty": {"lines": [], "labelled": False},
    }
    return manifest, _serve_in_a_bare_process(folder / "export" / "serve.pt", calls, folder), folder


def test_serve_pt_scores_10000_raw_lines_as_predict_does_bit_for_bit(run, served):
    trained, out, lines = run
    manifest, results, _ = served
    numbers, expected = _predict(trained, out / "raw.tsv")
    assert numbers.tolist() == list(range(1, 10_001)), "predict scores every generated line"
    assert results["first/valid"].all() and results["rest/valid"].all() and results["rows/valid"].all()
    for task in TASKS:
        scores = np.concatenate([results["first/" + task], results["rest/" + task]])
        assert scores.dtype == np.float32 and np.array_equal(scores, expected[task]), task
        assert np.array_equal(results["rows/" + task], expected[task][:8192]), task  # feature rows alike
    assert set(manifest["serve"]["outputs"]) == {"valid", *TASKS} and manifest["serve"]["file"] == "serve.pt"
    assert all(results[f"empty/{name}"].shape == (0,) for name in ["valid", *TASKS]), "an empty batch"
    assert manifest["serve"]["labelled_layout"][:LABELS] == ["click", "conversion", "rating"]


def test_the_lines_predict_rejects_are_not_valid_and_score_nan(run, served):
    trained, _, _ = run
    _, results, folder = served
    numbers, expected = _predict(trained, folder / "hostile.tsv")
    valid = results["hostile/valid"]
    assert (np.flatnonzero(valid) + 1).tolist() == numbers.tolist()
    # +7 and 007 integers, -3 (read as 0), -0 and 1F tokens, a 1.0 and an empty label, a rating, a CR line end
    assert np.flatnonzero(valid).tolist() == [3, 4, 5, 11, 13, 17, 20, 23, 24, 29]
    for task in TASKS:
        assert np.isnan(results["hostile/" + task][~valid]).all()
        np.testing.assert_allclose(results["hostile/" + task][valid], expected[task], rtol=1e-6, atol=1e-6)


def test_a_quantized_export_writes_a_serve_pt_that_loads_and_scores(run, tmp_path):
    trained, out, lines = run
    manifest = _export(out / "checkpoints", tmp_path / "export", quantize=True)
    assert manifest["quantized"] is True and manifest["serve"]["file"] == "serve.pt"
    unlabelled = ["\t".join(line.split("\t")[LABELS:]) for line in lines[:1000]]
    results = _serve_in_a_bare_process(tmp_path / "export" / "serve.pt",
                                       {"q": {"lines": [*unlabelled, "x\n"], "labelled": False}}, tmp_path)  # fmt: skip
    (tmp_path / "some.tsv").write_text("".join(lines[:1000]))
    _, expected = _predict(trained, tmp_path / "some.tsv")
    assert results["q/valid"].tolist() == [True] * 1000 + [False]
    for task in TASKS:  # int8 tables: measured 4e-4 on the probabilities, 3e-3 on the rating (test_cli_stages.py)
        assert np.abs(results["q/" + task][:1000] - expected[task]).max() <= 0.01, task
