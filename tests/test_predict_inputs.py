"""What predict reads: new traffic without labels, logs with a header row, lines too long; each layout scored with
the training run's own encoding, the same rows giving the same numbers, and a log of another layout refused at line 1.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_PASS, REAL_DATA
from torchrec_mtl.cli import main
from torchrec_mtl.data.preprocess import LogFormatError
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.inference import load_trained
from torchrec_mtl.predict import _Encoder, predict_file
from torchrec_mtl.schema import DatasetSchema

SCHEMA = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")
LABELS = len(SCHEMA.labels)  # the first columns of the synthetic layout
TASKS = ["ctr", "cvr", "rating", "ctcvr"]


@pytest.fixture(scope="module")
def run(tiny_bert_dir, tmp_path_factory):
    """A tiny MMoE with item text, trained for a few steps on a 3,000-row synthetic log."""
    data = tmp_path_factory.mktemp("predict_log")
    generate(SyntheticConfig(num_rows=3000, num_users=100, num_items=60, num_brands=20, num_sessions=200, seed=5), data)
    out = tmp_path_factory.mktemp("predict_run")
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", f"data.dir={data}", "data.generate=null", *ONE_PASS,
                 f"out_dir={out}", f"model.text.encoder={tiny_bert_dir}", "model.text.cache=item_text_tiny.npz",
                 "training.batch_size=256", "training.progress=false"]) == 0  # fmt: skip
    return load_trained(out / "checkpoints"), data, out


def _scores(path: Path) -> np.ndarray:
    header, *rows = path.read_text().splitlines()
    assert header.split("\t") == ["line", *TASKS]
    return np.array([[float(v) for v in row.split("\t")] for row in rows]).reshape(-1, 1 + len(TASKS))


def _score(trained, log: Path, **kwargs):
    out = log.with_suffix(".scores.tsv")
    summary = predict_file(trained, log, out, progress=False, **kwargs)
    assert summary["lines"] == summary["scored"] + summary["rejected"]
    return summary, _scores(out)


def test_labelled_empty_label_label_less_and_header_logs_score_the_same_rows_the_same(run, tmp_path):
    trained, data, out = run
    rows = [line.split("\t") for line in (data / "test.tsv").read_text().splitlines()[:300]]
    layouts = {
        "a_labelled": [row for row in rows],
        "b_empty_labels": [["", "", "", *row[LABELS:]] for row in rows],
        "c_no_label_columns": [row[LABELS:] for row in rows],
        # a header (columns in another order, no labels) names the columns; the values follow it
        "d_header": [list(reversed(SCHEMA.columns[LABELS:]))] + [list(reversed(row[LABELS:])) for row in rows],
    }
    results = {}
    for name, lines in layouts.items():
        log = tmp_path / f"{name}.tsv"
        log.write_text("".join("\t".join(fields) + "\n" for fields in lines))
        results[name] = _score(trained, log)
    _, labelled = results["a_labelled"]
    assert labelled[:, 0].tolist() == list(range(1, 301))
    for name, (summary, scores) in results.items():
        assert summary == {"lines": 300, "scored": 300, "rejected": 0, "reasons": {}}, name  # a header is no row
        assert scores[:, 0].tolist() == list(range(2 if name == "d_header" else 1, 301 + (name == "d_header")))
        np.testing.assert_array_equal(scores[:, 1:], labelled[:, 1:], err_msg=name)
    # the numbers are the training run's: its evaluation scored the same test rows
    saved = np.load(out / "predictions.npz")
    for column, task in enumerate(TASKS, start=1):
        np.testing.assert_allclose(
            results["c_no_label_columns"][1][:, column], saved[f"{task}.prediction"][:300], rtol=1e-4, atol=1e-5
        )


def test_the_layouts_encode_to_the_same_model_inputs(run):
    trained, data, _ = run
    encoder = _Encoder(trained)
    rows = [line.split("\t") for line in (data / "test.tsv").read_text().splitlines()[:500]]
    labelled = "".join("\t".join(row) + "\n" for row in rows).encode()
    bare = "".join("\t".join(row[LABELS:]) + "\n" for row in rows).encode()
    a = encoder.encode(labelled, 1)
    columns, chunk, first_line, too_long = encoder.layout("bare.tsv", bare, 1, [])
    assert columns == SCHEMA.columns[LABELS:] and chunk == bare and first_line == 1
    c = encoder.encode(chunk, first_line, columns, too_long)
    for x, y in zip(a[:3], c[:3]):
        np.testing.assert_array_equal(x, y)
    assert a[2].shape[1] == len(SCHEMA.categorical) + 1, "item text rows are part of the inputs"
    # a label that is there is still checked; an empty one is no problem
    odd = "\t".join(["yes", *rows[0][1:]]) + "\n" + "\t".join(["", "", "", *rows[1][LABELS:]]) + "\n"
    lines, _, _, rejections = encoder.encode(odd.encode(), 1)
    assert lines.tolist() == [2] and [(n, reason) for n, reason, *_ in rejections] == [(1, "label not 0/1")]


def test_a_log_of_another_layout_is_one_clear_error_before_anything_is_written(run, tmp_path):
    trained, data, _ = run
    row = (data / "test.tsv").read_text().splitlines()[0].split("\t")
    log = tmp_path / "other.tsv"
    log.write_text(("\t".join(row[1:]) + "\n") * 2)  # 23 fields: neither 24 nor 21
    out = tmp_path / "scores.tsv"
    message = rf"{log}:1: 23 fields; predict reads 24 \(the training layout .*\), 21 \(the same without .*\)"
    with pytest.raises(LogFormatError, match=message):
        predict_file(trained, log, out, progress=False)
    assert not out.exists(), "no header-only file that looks like a result"
    # a header with a column the schema does not know names it
    log.write_text("\t".join([*SCHEMA.columns[LABELS:], "request_id"]) + "\n")
    with pytest.raises(LogFormatError, match=r"other.tsv:1: 22 fields.*\['request_id'\] are not columns"):
        predict_file(trained, log, out, progress=False)
    # through the CLI: exit code 2 and the message, no traceback
    assert main(["predict", "--checkpoint", str(run[2] / "checkpoints"), "--input", str(log), "--quiet"]) == 2


def test_a_line_too_long_is_rejected_without_being_read_whole_and_the_line_numbers_stay_exact(
    run, tmp_path, monkeypatch
):
    trained, data, _ = run
    lines = (data / "test.tsv").read_text().splitlines(keepends=True)[:40]
    log = tmp_path / "long.tsv"
    log.write_text("".join(lines[:10]) + "1\t0\t" + "9" * (5 << 20) + "\n" + "".join(lines[10:]))
    monkeypatch.setattr("torchrec_mtl.predict.CHUNK_BYTES", 16 << 10)  # the line streams by in many reads
    tracemalloc.start()
    try:
        summary, scores = _score(trained, log, max_line_bytes=64 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak:,} bytes traced: the 5 MiB line was held"
    assert summary["lines"] == 41 and summary["scored"] == 40 and summary["reasons"] == {"line too long": 1}
    assert scores[:, 0].tolist() == [*range(1, 11), *range(12, 42)]
    plain = tmp_path / "plain.tsv"
    plain.write_text("".join(lines))
    # other chunks, so other batches: the same numbers to float32 rounding
    np.testing.assert_allclose(scores[:, 1:], _score(trained, plain)[1][:, 1:], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not (REAL_DATA / "ali-ccp-sample").exists(), reason=f"no Ali-CCP sample in {REAL_DATA}")
def test_a_header_csv_of_a_header_schema_scores_with_and_without_its_labels(tmp_path, capsys):
    """Ali-CCP (header: true, comma-separated, vocabularies): the training CSV, then its rows without the labels
    and with the columns in another order, score alike."""
    sample = REAL_DATA / "ali-ccp-sample"
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/mmoe_criteo_kaggle.yaml", f"data.dir={sample}",
                 "data.schema=configs/datasets/ali_ccp.yaml", "data.train=[torchrechub_ali_ccp_train_sample.csv]",
                 "data.test=[torchrechub_ali_ccp_test_sample.csv]", "data.test_fraction=0",
                 f"data.shards={tmp_path / 'shards'}", f"out_dir={out}", "training.batch_size=32",
                 "training.progress=false", "objective.tasks={ctr: {label: click, kind: binary}, "
                 "ctcvr: {label: purchase, kind: binary}}"]) == 0  # fmt: skip
    header, *rows = (sample / "torchrechub_ali_ccp_test_sample.csv").read_text().splitlines()
    names = header.split(",")
    order = [i for i in reversed(range(len(names))) if names[i] not in ("click", "purchase")]
    moved = tmp_path / "unlabelled.csv"
    moved.write_text("\n".join(",".join(row.split(",")[i] for i in order) for row in [header, *rows]) + "\n")
    results = []
    for log in (sample / "torchrechub_ali_ccp_test_sample.csv", moved):
        scores = tmp_path / f"{log.stem}.tsv"
        assert main(["predict", "--checkpoint", str(out / "checkpoints"), "--input", str(log), "--out", str(scores),
                     "--quiet"]) == 0  # fmt: skip
        summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert summary["scored"] == len(rows) and summary["rejected"] == 0
        header_line, *lines = scores.read_text().splitlines()
        assert header_line == "line\tctr\tctcvr"
        results.append(np.array([[float(v) for v in line.split("\t")] for line in lines]))
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0][:, 0].tolist() == list(range(2, len(rows) + 2))
    saved = np.load(out / "predictions.npz")
    np.testing.assert_allclose(results[0][:, 1], saved["ctr.prediction"][: len(rows)], rtol=1e-4, atol=1e-5)


def _encoder_of(schema: str, tmp_path: Path) -> _Encoder:
    """The encoder of a run on ``schema`` with empty vocabularies and no item text (enough to read a layout)."""
    from types import SimpleNamespace

    from torchrec_mtl.config import DataConfig

    (tmp_path / "vocab").mkdir(exist_ok=True)
    rules = DatasetSchema.from_yaml(schema)
    for feature in rules.categorical:
        np.save(tmp_path / "vocab" / f"{feature}.npy", np.zeros(0, dtype=np.int64))
    config = SimpleNamespace(data=DataConfig(schema=schema, shards=str(tmp_path)))
    return _Encoder(SimpleNamespace(config=config, inputs={"item_text": None}))


def test_the_first_line_read_whole_decides_and_padded_rows_are_decided_by_full_ones(tmp_path):
    from torchrec_mtl.data.preprocess import LineTooLong

    criteo = _encoder_of("configs/datasets/criteo_kaggle.yaml", tmp_path)  # pads short rows; 40 columns with label
    full, bare, short = ("\t".join(["1"] * n) for n in (40, 39, 30))
    for lines, expected in [
        ([short, full], criteo.columns),  # a stripped training row first: the full one decides
        ([short, bare], criteo.unlabeled),
        ([bare, full], criteo.columns),  # 39 fields may be a training row with its last field stripped
        ([bare, bare], criteo.unlabeled),
        ([short, short], criteo.columns),  # undecidable: read as preprocessing reads it
    ]:
        chunk = ("\n".join(lines) + "\n").encode()
        assert criteo.layout("c.tsv", chunk, 1, [])[0] == expected, lines
    synthetic = _encoder_of("configs/datasets/synthetic.yaml", tmp_path)
    bare = "\t".join(["1"] * 13 + ["a1"] * 8)
    stand_in = LineTooLong(index=1, length=10 << 20, limit=1 << 20, head=b"1")
    columns, chunk, first_line, too_long = synthetic.layout("s.tsv", ("\n\n" + bare + "\n").encode(), 1, [stand_in])
    assert columns == synthetic.unlabeled and first_line == 1 and too_long == [stand_in], "empty and long lines skip"
    assert synthetic.layout("s.tsv", b"\n\r\n", 1, [])[0] is None, "nothing to decide on yet"
    with pytest.raises(LogFormatError, match=r"s.tsv:3: 22 fields"):
        synthetic.layout("s.tsv", ("\n\n" + bare + "\tx\n").encode(), 1, [])


def test_an_ensemble_scores_the_rows_every_member_accepts_and_rejects_each_line_any_member_rejects():
    """The members of an ensemble share a schema, but a sequence model rejects rows whose aligned histories keep
    different lengths, which a model pooling them reads: each member's rows are cut to the common ones."""
    from torchrec_mtl.data.preprocess import ListValues
    from torchrec_mtl.predict import SEQUENCE_LENGTHS_DIFFER, EncodedRows, _common_rows

    def encoded(lines, rejections):
        """Rows whose every input is their line number: a list of that many values."""
        lines = np.array(lines)
        lists = ListValues(np.repeat(lines, lines).astype(np.int64), lines.astype(np.int32))
        return EncodedRows(lines, lines[:, None].astype(np.float32), lines[:, None], [lists], rejections)

    empty = (4, "list element empty", "history", "a||b", "...")
    differ = (2, SEQUENCE_LENGTHS_DIFFER, "hist_category", "keeps 1, history 2", "...")
    pooled, sequence = encoded([1, 2, 3, 5], [empty]), encoded([1, 3, 5], [differ, empty])
    assert _common_rows([pooled])[0] is pooled and all(r is sequence for r in _common_rows([sequence, sequence]))
    for rows in _common_rows([pooled, sequence]):
        assert rows.line_numbers.tolist() == [1, 3, 5] and rows.rejections == [differ, empty]
        assert rows.dense[:, 0].tolist() == rows.sparse[:, 0].tolist() == [1, 3, 5]
        assert rows.lists[0].lengths.tolist() == [1, 3, 5]
        assert rows.lists[0].values.tolist() == [1, 3, 3, 3, 5, 5, 5, 5, 5]
