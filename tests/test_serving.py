"""serve.pt's encoder against predict's: the same field rules as polars', the same model inputs from the same raw
lines, and the same lines rejected, for hostile fields and layouts, on the synthetic schema (hex, min_count
vocabularies, item text) and on a decimal one (hashed and vocabulary features, numeric columns, an ignored column,
labels mid-row, padded short rows, a comma separator). The exported artifact end to end: tests/test_serving_export.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Tuple

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from torchrec_mtl.config import DataConfig
from torchrec_mtl.data.preprocess.fields import parse_decimal, parse_number, parse_token
from torchrec_mtl.predict import _Encoder
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.serving import RawRowEncoder
from torchrec_mtl.text.table import ItemTextTable

DECIMAL_SCHEMA = {
    "name": "serving_test", "labels": {"click": "binary", "rating": {"kind": "regression", "optional": True}},
    "integer": ["i1", "i2"], "numeric": ["n1", "n2"], "categorical": ["user", "item", "genre", "city"],
    "columns": ["i1", "user", "click", "n1", "ts", "item", "i2", "rating", "n2", "genre", "city"], "ignore": ["ts"],
    "categorical_format": "decimal", "separator": ",", "pad_short_rows": True, "vocabulary": {"hash_size": 1000},
    "feature_vocabulary": {"user": {"min_count": 2}, "item": {"min_count": 1}}, "item_text_key": "item",
}  # fmt: skip
SYNTHETIC_SCHEMA = yaml.safe_load(Path("configs/datasets/synthetic.yaml").read_text())
# Hostile values per kind of field, beside the well-formed ones; none holds a line end.
HOSTILE = {
    "integer": ["+7", "-3", "007", " 7", "7 ", "1.5", "1e3", "9223372036854775807", "9223372036854775808",
                "-9223372036854775808", "x", "\u0663", "1_0", '"7"', "\t", "0x7"],
    "numeric": ["-0", "1.5", ".5", "5.", "1e5", "1E-5", "+2", "inf", "-Infinity", "nan", "1e39", "3.4028235e38",
                "3.5e38", "1e-400", "-1e-400", " 1", "1,5", "0x10", "abc", "1e", ".", "1.e3", "+.5e-3", "00.5"],
    "categorical": ["0", "-0", "-00", "+1", "-1", "g", "7fffffffffffffff", "8000000000000000", " 1", "1 ", "0x1",
                    "\u00e9", "1.0", "1e2", "-"],
    "binary": ["0", "1", "1.0", "0e5", "-0", "+1", "2", "yes", "nan", " 1", "0.99999999999999999999", "1e0"],
    "regression": ["3.5", "-2", "1e39", "inf", "x", "1e-400", "3.4028235e38", "+.5"],
}  # fmt: skip


def test_the_field_readers_agree_with_polars_on_random_text():
    rng = np.random.default_rng(0)
    alphabet = list("0123456789abcdefABCDEF+-.eE xinf_\t") + ["\u00e9", "\u0663", "\x00", "\r"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(1, 9))) for _ in range(4000)]
    texts += ["".join(rng.choice(list("0123456789+-.eE"), size=rng.integers(1, 26))) for _ in range(4000)]
    texts += [v for values in HOSTILE.values() for v in values] + ["0e99999999999999999999", "1e-99999999999999999999"]
    read = pl.DataFrame({"t": texts}).select(
        pl.col("t").str.to_integer(base=10, strict=False).alias("d"),
        pl.col("t").str.to_integer(base=16, strict=False).alias("h"),
        pl.col("t").cast(pl.Float64, strict=False).alias("f"),
    )
    decimal, token, number = (torch.jit.script(f) for f in (parse_decimal, parse_token, parse_number))
    for text, d, h, f in zip(texts, *(read[c].to_list() for c in "dhf")):
        assert decimal(text) == ((True, d) if d is not None else (False, 0)), text
        for hexadecimal, value in ((True, h), (False, d)):  # a token has no sign and is not negative
            good = value is not None and value >= 0 and not text.startswith("+")
            assert token(text, hexadecimal) == ((True, value) if good else (False, 0)), (text, hexadecimal)
        status, value = number(text)
        if f is None or not np.isfinite(f) or abs(f) >= 1e39:
            assert status == 0, text
        elif status == 1:  # the same float64, sign of zero included
            assert np.float64(value).tobytes() == np.float64(f).tobytes(), text
        else:  # below float64's normal range: the same float32
            assert status == 2 and np.float32(value).tobytes() == np.float32(f).tobytes(), text


def _encoders(raw: dict, folder: Path, vocabularies: dict, table: Optional[ItemTextTable]) -> Tuple[_Encoder, object]:
    """predict's encoder and the scripted RawRowEncoder of a run on schema ``raw`` with these vocabularies (by the
    column that owns each) and item-text table (None: no item text)."""
    (folder / "vocab").mkdir()
    for feature, tokens in vocabularies.items():
        np.save(folder / "vocab" / f"{feature}.npy", tokens)
    (folder / "schema.yaml").write_text(yaml.safe_dump(raw))
    config = SimpleNamespace(data=DataConfig(schema=str(folder / "schema.yaml"), shards=str(folder)))
    predict = _Encoder(SimpleNamespace(config=config, inputs={"item_text": None}))
    text = ()
    if table is not None:
        key = predict.schema.key_columns.index(predict.schema.item_text_key)
        predict.text_rows = lambda keys: table.rows(keys[:, key])
        text = (table.sorted_keys, table.sorted_rows)
    serve = torch.jit.script(RawRowEncoder(predict.schema, vocabularies, *text))
    saved = io.BytesIO()  # as saved and loaded again: TorchScript writes code it may not read back ("\r")
    torch.jit.save(serve, saved)
    saved.seek(0)
    return predict, torch.jit.load(saved)


def _lines(schema: DatasetSchema, tokens: np.ndarray, labelled: bool, rng: np.random.Generator) -> List[str]:
    """1,500 lines of ``schema``'s layout: half well formed, the others with a hostile field or a bad field count."""
    layout = [c for c in schema.columns if labelled or c not in schema.labels]
    as_text = (lambda t: format(int(t), "08x")) if schema.categorical_format == "hex" else (lambda t: str(int(t)))

    def good(column: str) -> str:
        if rng.random() < 0.1:
            return ""
        if column in schema.integer:
            return str(int(rng.integers(-5, 5000)))
        if column in schema.numeric:
            return repr(float(rng.standard_normal() * 10.0 ** rng.integers(-5, 5)))
        if column in schema.categorical:
            return as_text(rng.choice(tokens) if rng.random() < 0.8 else rng.integers(0, 2**40))
        if column in schema.labels:
            return str(int(rng.integers(0, 2))) if schema.labels[column].kind == "binary" else str(rng.integers(1, 6))
        return "whatever"  # an ignored column

    def kind(column: str) -> str:
        if column in schema.labels:
            return schema.labels[column].kind
        return "integer" if column in schema.integer else "numeric" if column in schema.numeric else "categorical"

    lines = []
    for i in range(1500):
        fields = [good(c) for c in layout]
        if i % 2:
            for _ in range(rng.integers(1, 3)):
                column = int(rng.integers(len(layout)))
                if layout[column] not in schema.ignore:
                    fields[column] = str(rng.choice(HOSTILE[kind(layout[column])]))
        if i % 7 == 3:
            fields = fields[: int(rng.integers(0, len(fields)))]  # short: padded where only categoricals are missing
        if i % 11 == 5:
            fields.append(str(rng.choice(["", "1"])))  # one field too many
        lines.append(schema.separator.join(fields) + ("\r\n" if i % 5 == 0 else "\n"))
    return lines + ["\n", "\r\n", schema.separator * (len(layout) - 1) + "\n"]


@pytest.mark.parametrize("name", ["synthetic", "decimal"])
@pytest.mark.parametrize("labelled", [True, False])
def test_raw_lines_encode_to_predicts_inputs_and_the_lines_it_rejects_are_not_valid(tmp_path, name, labelled):
    raw = SYNTHETIC_SCHEMA if name == "synthetic" else DECIMAL_SCHEMA
    schema = DatasetSchema.from_dict(raw)
    rng = np.random.default_rng(len(name) + labelled)
    tokens = np.unique(rng.integers(0, 2**32, 300))
    frequency = [f for f in schema.categorical if not schema.vocabulary_rule(f).is_hash]
    vocabularies = {f: np.sort(rng.choice(tokens, 200, replace=False)) for f in frequency}
    keys = rng.choice(tokens, 100, replace=False)
    order = np.argsort(keys)
    table = ItemTextTable(np.zeros((101, 4), np.float32), np.ones(101, bool), keys[order], (order + 1).astype(np.int32),
                          [""] * 101)  # fmt: skip
    predict, serve = _encoders(raw, tmp_path, vocabularies, table)
    lines = _lines(schema, tokens, labelled, rng)
    layout = predict.columns if labelled else predict.unlabeled
    for chunk_lines in (lines, [*lines, "1\r2\n"]):  # a CR inside a line sends predict's reader down its other path
        scored, dense, sparse, rejections = predict.encode("".join(chunk_lines).encode(), 1, layout)
        valid, serve_dense, serve_sparse = serve.encode_lines(chunk_lines, labelled)
        assert (np.flatnonzero(valid.numpy()) + 1).tolist() == scored.tolist()
        assert 0.35 < len(rejections) / len(chunk_lines) < 0.65, "half the lines hostile"
        # bit for bit: the sign of a zero included
        assert serve_dense[valid].numpy().view(np.uint32).tolist() == dense.view(np.uint32).tolist()
        assert serve_sparse.dtype == torch.int64 and np.array_equal(serve_sparse[valid].numpy(), sparse)
        assert serve_sparse.shape[1] == len(schema.categorical) + 1 and sparse[:, -1].any(), "item text rows"
    short = [len(line.split(schema.separator)) < len(layout) for line in lines]
    assert any(v and s for v, s in zip(valid.tolist(), short)) == schema.pad_short_rows, "padded short rows"
    # the lines of the layout's length, as feature fields: forward reads them alike (it has no labels to refuse)
    fields = [line.rstrip("\r\n").split(schema.separator) for line in lines]
    kept = [i for i, f in enumerate(fields) if len(f) == len(layout)]
    features = [[fields[i][j] for j, c in enumerate(layout) if c in serve.columns] for i in kept]
    valid_rows, dense_rows, sparse_rows = serve(features)
    valid, dense, sparse = serve.encode_lines([lines[i] for i in kept], labelled)
    assert torch.equal(valid_rows & valid, valid) and (labelled or torch.equal(valid_rows, valid))
    assert torch.equal(dense_rows[valid], dense[valid]) and torch.equal(sparse_rows[valid], sparse[valid])


def test_rows_of_another_length_an_empty_batch_and_the_documented_corner(tmp_path):
    table = ItemTextTable(np.zeros((2, 4), np.float32), np.ones(2, bool), np.array([5]), np.array([1]), ["", ""])
    _, serve = _encoders(DECIMAL_SCHEMA, tmp_path, {"user": np.array([3, 9]), "item": np.array([5])}, table)
    assert serve.columns == ["i1", "user", "n1", "item", "i2", "n2", "genre", "city"]
    row = ["4", "9", "-0", "5", "", "2.5", "77", ""]
    valid, dense, sparse = serve([row, row[:-1], [*row, ""], ["4", "9", "-0", "5", "", "2.5", "+77", ""]])
    assert valid.tolist() == [True, False, False, False]
    assert dense[0].tolist() == [np.log1p(4.0).astype(np.float32), 0.0, -0.0, 2.5] and str(dense[0, 2].item()) == "-0.0"
    assert sparse[0].tolist() == [2, 1, 1 + 77 % 999, 0, 1], "vocabulary rows, hashed rows, the item's text row"
    valid, dense, sparse = serve([])
    assert valid.shape == (0,) and dense.shape == (0, 4) and sparse.shape == (0, 5)
    # a binary label below float64's normal range: polars reads 1e-400 as 0 (a valid label), serve.pt refuses the row
    line = "4,9,1e-400,-0,x,5,,,2.5,77,\n"
    assert serve.encode_lines([line, line.replace("1e-400", "0")], True)[0].tolist() == [False, True]


# --- list columns -------------------------------------------------------------------------------------------------

# A decimal schema whose history shares the item's min_count vocabulary (kept last) and whose tags are hashed (kept
# first), with a list before a single-ID column and a ";" separator beside the file's ",".
DECIMAL_LISTS = {
    "name": "serving_lists", "labels": {"click": "binary"}, "integer": ["i1"],
    "categorical": ["user", "history", "item", "tags"], "categorical_format": "decimal", "separator": ",",
    "vocabulary": {"hash_size": 1000}, "feature_vocabulary": {"item": {"min_count": 1}, "history": {"min_count": 1}},
    "lists": {"history": {"separator": ";", "max_length": 4, "keep": "last", "shares": "item"},
              "tags": {"separator": "|", "max_length": 2, "pooling": "sum"}},
}  # fmt: skip
HOSTILE_ELEMENTS = ["", "+1", "-1", "-0", "-", " 1", "1 ", "x", "0x1", "1.0", "\u00e9", "99999999999999999999", "1,2"]


def test_the_list_reader_agrees_with_preprocessings_list_rule_on_random_text():
    from torchrec_mtl.data.preprocess.fields import parse_list
    from torchrec_mtl.data.preprocess.parse import _list_rules

    rng = np.random.default_rng(1)
    alphabet = list("0123456789abcdefAF|;+- x") + ["\u00e9", "\r"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 14))) for _ in range(6000)]
    texts += ["|".join(rng.choice(HOSTILE_ELEMENTS + ["7", "ff"], size=rng.integers(1, 4))) for _ in range(500)]
    scripted = torch.jit.script(parse_list)
    for hexadecimal in (True, False):
        raw = {**DECIMAL_LISTS, "categorical_format": "hex" if hexadecimal else "decimal"}
        raw["lists"] = {"tags": {"separator": "|", "max_length": 2}}
        schema = DatasetSchema.from_dict(raw)
        parse, bad, reason = _list_rules(schema, "tags", pl.col("t"), pl.col("v"))
        # the CSV reader gives an empty field as null, which the rule reads as the empty list
        frame = pl.DataFrame({"t": texts}).with_columns(pl.col("t").replace("", None)).with_columns(parse.alias("v"))
        read = frame.select(bad.alias("bad"), reason.alias("reason"), pl.col("v"))
        for text, rejected, why, values in zip(texts, *(read[c].to_list() for c in ("bad", "reason", "v"))):
            status, tokens = scripted(text, "|", hexadecimal)
            if not rejected:
                assert (status, tokens) == (0, values or []), (text, hexadecimal)
            else:
                expected = 1 if why == "list element empty" else 2
                assert (status, tokens) == (expected, []), (text, hexadecimal, why)


def _list_lines(schema: DatasetSchema, tokens: np.ndarray, rng: np.random.Generator) -> List[str]:
    """Lines of every list length from empty to past max_length, half of them with a hostile element or field."""
    lines = []
    for i in range(1200):
        history = [str(int(t)) for t in rng.choice(tokens, i % 7)]  # 0..6 tokens, max_length 4
        tags = [str(int(t)) for t in rng.integers(0, 10**6, i % 4)]  # 0..3 tokens, max_length 2
        if i % 2:
            which = history if (history and rng.random() < 0.5) or not tags else tags
            if which:
                which[int(rng.integers(len(which)))] = str(rng.choice(HOSTILE_ELEMENTS))
            else:
                which.append(str(rng.choice(HOSTILE_ELEMENTS[1:])))
        fields = [str(int(rng.integers(0, 2))), str(int(rng.integers(0, 50))), str(int(rng.choice(tokens))),
                  ";".join(history), str(int(rng.choice(tokens))), "|".join(tags)]  # fmt: skip
        lines.append(",".join(fields) + "\n")
    return lines


@pytest.mark.parametrize("labelled", [True, False])
def test_raw_lines_with_lists_encode_to_predicts_inputs_and_lists_it_rejects_are_not_valid(tmp_path, labelled):
    schema = DatasetSchema.from_dict(DECIMAL_LISTS)
    assert schema.columns == ["click", "i1", "user", "history", "item", "tags"]
    rng = np.random.default_rng(7 + labelled)
    tokens = np.unique(rng.integers(0, 10**6, 300))
    vocabulary = np.sort(rng.choice(tokens, 200, replace=False))  # the others are unseen: row 0
    predict, serve = _encoders(DECIMAL_LISTS, tmp_path, {"item": vocabulary}, None)
    lines = _list_lines(schema, tokens, rng)
    if not labelled:
        lines = [line.split(",", 1)[1] for line in lines]
    layout = predict.columns if labelled else predict.unlabeled
    rows = predict.encode_rows("".join(lines).encode(), 1, layout)
    valid, dense, sparse, values, lengths = serve.encode_lines_with_lists(lines, labelled)
    assert (np.flatnonzero(valid.numpy()) + 1).tolist() == rows.line_numbers.tolist()
    reasons = {reason for _, reason, *_ in rows.rejections}
    assert {"list element empty", "list element not id"} <= reasons and 0.35 < len(rows.rejections) / len(lines) < 0.65
    expected = rows.model_inputs(0, len(rows), torch.device("cpu"))
    assert torch.equal(dense[valid], expected[0]) and torch.equal(sparse[valid], expected[1])
    # the lists: rows not valid are empty, so the values are those of the valid rows, list after list
    assert lengths.dtype == torch.int32 and lengths.shape == (2, len(lines)) and not lengths[:, ~valid].any()
    assert torch.equal(lengths[:, valid], expected[3]) and torch.equal(values, expected[2])
    assert set(lengths[0, valid].tolist()) == {0, 1, 2, 3, 4} and set(lengths[1, valid].tolist()) == {0, 1, 2}
    # truncation by keep (history: its last 4, tags: their first 2) and the rows: vocabulary or hash
    line = "1,3,5," + ";".join(str(int(t)) for t in vocabulary[:6]) + ",7,11|12|13\n"
    _, _, _, values, lengths = serve.encode_lines_with_lists([line if labelled else line[2:]], labelled)
    assert lengths.tolist() == [[4], [2]] and values.tolist() == [3, 4, 5, 6, 1 + 11 % 999, 1 + 12 % 999]
    # forward's fields alike (the columns without labels, in the file's order)
    assert serve.columns == ["i1", "user", "history", "item", "tags"]
    _, _, _, values, lengths = serve.encode_rows([["3", "5", "", "7", "4|4"], ["3", "5", "1;;2", "7", ""]])
    assert lengths.tolist() == [[0, 0], [2, 0]] and values.tolist() == [1 + 4 % 999] * 2
