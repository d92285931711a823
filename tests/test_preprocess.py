"""Preprocessing real files on disk: every row used or rejected with its reason, gzip and many files, splits, shards."""

from __future__ import annotations

import gzip
import json

import numpy as np
import polars as pl
import pytest
import yaml

from torchrec_mtl.data.preprocess import LogFormatError, TooManyBadRows, preprocess
from torchrec_mtl.data.shards import ShardedLog, ShardError
from torchrec_mtl.schema import DatasetSchema, SchemaError

SCHEMA = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")
INTS = ["", "-5", "0", "9"] + ["1"] * 9


def _row(click="1", conversion="0", rating="4.5", ints=None, cats=None) -> str:
    cats = cats or ["aa", "bb", "", "cc", "dd", "ee", "ff", "a0"]
    return "\t".join([click, conversion, rating, *(ints or INTS), *cats])


def _good(i: int) -> str:
    """A valid row whose first dense feature, log(1 + i), identifies it."""
    return _row(ints=[str(i)] + INTS[1:], cats=[f"{i % 3:x}", "b", "c", "d", "e", "f", f"{i:x}", "1"])


# One line per rejection reason, in the order of the table in preprocess.py, with the column each one names.
BAD_LINES = {
    "empty line": ("", ""),
    "too many fields": (_row() + "\textra", ""),
    "too few fields": ("1\t0\t\t1\t2", ""),
    "label missing": (_row(click=""), "click"),
    "label not 0/1": (_row(conversion="yes"), "conversion"),
    "label not a number": (_row(rating="inf"), "rating"),
    "integer not valid": (_row(ints=["1.5"] + INTS[1:]), "I1"),
    "categorical not hex": (_row(cats=["aa", "zz", "", "cc", "dd", "ee", "ff", "a0"]), "C2"),
}


def _write(path, lines, compress=False):
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _all_rows(log: ShardedLog, split: str):
    shards = log.split(split)
    return (
        np.concatenate([s.dense for s in shards]),
        np.concatenate([s.sparse for s in shards]),
        {k: np.concatenate([s.labels[k] for s in shards]) for k in log.label_kinds},
    )


def test_each_bad_row_is_counted_by_reason_and_written_to_the_rejects_file(tmp_path):
    good = [_good(i) for i in range(20)]
    lines = good[:10] + [line for line, _ in BAD_LINES.values()] + good[10:]
    log_path = _write(tmp_path / "log.tsv", lines)
    summary = preprocess(SCHEMA, {"train": [log_path]}, tmp_path / "out", max_bad_fraction=1.0, progress=False)

    assert summary.rows_read == len(lines) == summary.total_written + summary.rows_rejected
    assert summary.rows_written == {"train": 20}
    assert dict(summary.rejected) == {reason: 1 for reason in BAD_LINES}
    rejects = pl.read_csv(tmp_path / "out" / "rejects.tsv", separator="\t", quote_char=None, infer_schema=False)
    rejects = rejects.fill_null("")
    assert rejects["reason"].to_list() == list(BAD_LINES)
    assert rejects["line"].cast(int).to_list() == list(range(11, 11 + len(BAD_LINES))), "1-based line numbers"
    assert rejects["column"].to_list() == [column for _, column in BAD_LINES.values()]
    assert rejects["file"].unique().to_list() == [str(log_path)]
    assert summary.examples[0].line == 11 and str(log_path) in str(summary.examples[0])
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["counts"]["rows_read"] == len(lines)
    assert metadata["counts"]["rejected_by_reason"] == {reason: 1 for reason in BAD_LINES}


def test_numeric_and_decimal_id_reasons(tmp_path):
    schema = DatasetSchema.from_dict(
        {
            "name": "t",
            "labels": {"y": "binary"},
            "integer": [],
            "numeric": ["x"],
            "categorical": ["c"],
            "categorical_format": "decimal",
            "separator": ",",
            "header": True,
            "ignore": ["id"],
        }
    )
    path = _write(tmp_path / "t.csv", ["id,c,x,y", "7,12,0.5,1", "8,-3,0.5,0", "9,4,nan,0", "10,+4,1,1", "11,0x1,1,1"])
    summary = preprocess(schema, {"train": [path]}, tmp_path / "out", max_bad_fraction=1.0, progress=False)
    assert summary.rows_read == 5 and summary.total_written == 1
    assert summary.rejected == {"categorical not id": 3, "numeric not valid": 1}
    dense, sparse, labels = _all_rows(ShardedLog.open(tmp_path / "out"), "train")
    assert dense.tolist() == [[0.5]] and sparse.tolist() == [[1]] and labels["y"].tolist() == [1.0]


def test_encoding_rules(tmp_path):
    lines = [
        _row(cats=["aa", "bb", "", "cc", "dd", "ee", "ff", "a0"]),
        _row(click="0", rating="", cats=["AA"] + ["aa"] * 7),
    ]
    summary = preprocess(SCHEMA, {"train": [_write(tmp_path / "l.tsv", lines)]}, tmp_path / "out", progress=False)
    assert summary.total_written == 2
    log = ShardedLog.open(tmp_path / "out")
    dense, sparse, labels = _all_rows(log, "train")
    np.testing.assert_allclose(dense[0, :4], [0.0, 0.0, 0.0, np.log(10.0)], rtol=1e-6)  # log(1 + max(x, 0)), "" -> 0
    # min_count 2 on C1: "aa" and "AA" are the same hex token (kept, row 1); C2's "bb" and "aa" are seen once (row 0)
    assert sparse[:, 0].tolist() == [1, 1] and sparse[:, 1].tolist() == [0, 0]
    assert sparse[0, 2] == 0, "an empty categorical is row 0"
    assert np.isnan(labels["rating"][1]) and labels["rating"][0] == 4.5
    assert log.table_sizes["C1"] == 2 and log.label_mean("train", "rating") == 4.5
    assert np.load(tmp_path / "out" / "vocab" / "C1.npy").tolist() == [0xAA]
    # the identity columns keep their raw tokens although C2's rare tokens share row 0
    keys = log.split("train")[0].keys
    assert log.key_columns == ["C1", "C2"] and keys["C2"].tolist() == [0xBB, 0xAA] and keys["C1"].tolist() == [0xAA] * 2


def test_hashed_tables_follow_the_torchrec_rule(tmp_path):
    schema = DatasetSchema.from_yaml("configs/datasets/criteo_terabyte.yaml")
    cats = ["ff", ""] + ["1"] * 24
    path = _write(tmp_path / "c.tsv", ["\t".join(["1", *(["3"] * 13), *cats])])
    preprocess(schema, {"train": [path]}, tmp_path / "out", progress=False)
    _, sparse, _ = _all_rows(ShardedLog.open(tmp_path / "out"), "train")
    assert sparse[0, 0] == 1 + 0xFF % (10_000_000 - 1) and sparse[0, 1] == 0


def test_gzip_and_many_files_give_the_same_rows_as_one_plain_file(tmp_path):
    lines = [_good(i) for i in range(300)]
    plain = _write(tmp_path / "all.tsv", lines)
    parts = [_write(tmp_path / f"day{i}.tsv.gz", lines[i * 100 : (i + 1) * 100], compress=True) for i in range(3)]
    preprocess(SCHEMA, {"train": [plain]}, tmp_path / "one", progress=False)
    summary = preprocess(SCHEMA, {"train": parts[:2], "test": parts[2:]}, tmp_path / "many", progress=False)
    assert summary.rows_written == {"train": 200, "test": 100}
    one, many = ShardedLog.open(tmp_path / "one"), ShardedLog.open(tmp_path / "many")
    for a, b in zip(_all_rows(one, "train")[:2], _all_rows(many, "train")[:2]):
        np.testing.assert_array_equal(a[:200], b)
    assert [i["rows_read"] for i in many.metadata["inputs"]] == [100, 100, 100]


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "day.tsv.gz", [_good(i) for i in range(5000)], compress=True)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(LogFormatError, match=r"day.tsv.gz: compressed data is truncated or corrupt"):
        preprocess(SCHEMA, {"train": [path]}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists(), "nothing half-written where the shards go"


def test_too_many_bad_rows_stop_the_run_with_counts_and_the_rejects_file(tmp_path):
    lines = [_good(i) for i in range(95)] + [_row(click="2")] * 5
    path = _write(tmp_path / "l.tsv", lines)
    with pytest.raises(TooManyBadRows, match=r"5 of 100 rows .* > max_bad_fraction 1.00%") as error:
        preprocess(SCHEMA, {"train": [path]}, tmp_path / "out", max_bad_fraction=0.01, progress=False)
    assert "label not 0/1: 5" in str(error.value) and "rejects.tsv" in str(error.value)
    assert not (tmp_path / "out").exists()
    summary = preprocess(SCHEMA, {"train": [path]}, tmp_path / "out", max_bad_fraction=0.05, progress=False)
    assert summary.total_written == 95


def test_chunk_boundaries_line_ends_and_odd_bytes_change_nothing(tmp_path):
    lines = [_good(i) for i in range(200)]
    lines[50] = _row(click="x")
    plain = _write(tmp_path / "a.tsv", lines)
    # CR LF line ends, a byte order mark, a NUL byte and invalid UTF-8 in rows that must then be rejected
    odd_lines = [line + "\r" for line in lines]
    odd = tmp_path / "b.tsv"
    odd.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\n" for line in odd_lines).encode() + b"1\x00\t0\n\xff\xfe\n")
    results = []
    for name, path, chunk_bytes in [("a", plain, 8 << 20), ("b", plain, 300), ("c", odd, 8 << 20), ("d", odd, 999)]:
        summary = preprocess(
            SCHEMA, {"train": [path]}, tmp_path / name, chunk_bytes=chunk_bytes, max_bad_fraction=1, progress=False
        )
        results.append((summary, _all_rows(ShardedLog.open(tmp_path / name), "train")))
    for summary, rows in results:
        assert summary.total_written == 199
        assert summary.examples[0].line == 51
        np.testing.assert_array_equal(rows[1], results[0][1][1])
        np.testing.assert_array_equal(rows[0], results[0][1][0])
    assert results[2][0].rows_read == 202 and results[2][0].rows_rejected == 3


def test_a_carriage_return_inside_a_line_takes_the_per_line_path(tmp_path):
    lines = [_good(i) for i in range(10)]
    lines[3] = lines[3].replace("\t", "\r\t", 1)
    path = _write(tmp_path / "l.tsv", lines)
    summary = preprocess(SCHEMA, {"train": [path]}, tmp_path / "o", max_bad_fraction=1, progress=False)
    assert summary.rows_read == 10 and summary.rejected == {"label not 0/1": 1}
    assert summary.examples[0].line == 4


def test_seeded_test_fraction_is_repeatable_and_independent_of_chunking(tmp_path):
    path = _write(tmp_path / "l.tsv", [_good(i) for i in range(2000)])

    preprocess(SCHEMA, {"train": [path]}, tmp_path / "a", test_fraction=0.25, split_seed=1, progress=False)
    preprocess(
        SCHEMA, {"train": [path]}, tmp_path / "b", test_fraction=0.25, split_seed=1, chunk_bytes=500, progress=False
    )
    preprocess(SCHEMA, {"train": [path]}, tmp_path / "c", test_fraction=0.25, split_seed=2, progress=False)
    a, b, c = (ShardedLog.open(tmp_path / n) for n in "abc")
    assert a.rows("train") + a.rows("test") == 2000 and 400 < a.rows("test") < 600
    test_rows = {
        name: set(np.round(np.expm1(_all_rows(log, "test")[0][:, 0])).astype(int))
        for name, log in zip("abc", (a, b, c))
    }
    train_rows = set(np.round(np.expm1(_all_rows(a, "train")[0][:, 0])).astype(int))
    assert test_rows["a"] == test_rows["b"], "the draw is per line, not per chunk"
    assert test_rows["a"] != test_rows["c"], "another seed draws other rows"
    assert test_rows["a"] | train_rows == set(range(2000)) and not test_rows["a"] & train_rows


def test_criteo_short_rows_are_padded_and_counted(tmp_path):
    schema = DatasetSchema.from_yaml("configs/datasets/criteo_kaggle.yaml")
    full = "\t".join(["1", *(["3"] * 13), *(["a1"] * 26)])
    short = "\t".join(["0", *(["3"] * 13), *(["a1"] * 23)])  # three trailing empty fields stripped
    path = _write(tmp_path / "c.tsv", [full, short, "1\t2"])
    summary = preprocess(schema, {"train": [path]}, tmp_path / "o", max_bad_fraction=1, progress=False)
    assert summary.padded == 1 and summary.total_written == 2 and summary.rejected == {"too few fields": 1}
    _, sparse, _ = _all_rows(ShardedLog.open(tmp_path / "o"), "train")
    assert sparse[1, 23:].tolist() == [0, 0, 0], "padded fields are missing values"


def test_header_files_are_matched_by_name_and_a_wrong_header_names_the_column(tmp_path):
    schema = DatasetSchema.from_dict(
        {"name": "t", "labels": {"y": "binary"}, "integer": ["n"], "categorical": ["c"], "header": True}
    )
    good = _write(tmp_path / "g.tsv", ["c\ty\tn", "ab\t1\t4"])
    preprocess(schema, {"train": [good]}, tmp_path / "o", progress=False)
    dense, sparse, labels = _all_rows(ShardedLog.open(tmp_path / "o"), "train")
    assert labels["y"].tolist() == [1.0] and dense[0, 0] == pytest.approx(np.log(5.0)) and sparse[0, 0] == 1
    bad = _write(tmp_path / "b.tsv", ["c\ty\tcount", "ab\t1\t4"])
    with pytest.raises(LogFormatError, match=r"b.tsv:1: header column 3 is 'count'"):
        preprocess(schema, {"train": [bad]}, tmp_path / "o2", progress=False)
    twice = _write(tmp_path / "t.tsv", ["c\ty\tn\tc", "ab\t1\t4\tcd"])  # which c is the feature?
    with pytest.raises(LogFormatError, match=r"t.tsv:1: header names column\(s\) \['c'\] twice"):
        preprocess(schema, {"train": [twice]}, tmp_path / "o3", progress=False)


def test_a_damaged_shard_is_refused_with_its_name(tmp_path):
    path = _write(tmp_path / "l.tsv", [_good(i) for i in range(100)])
    preprocess(SCHEMA, {"train": [path]}, tmp_path / "o", progress=False)
    shard = tmp_path / "o" / "train" / "part-00000.dense.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ShardError, match="part-00000.dense.npy"):
        ShardedLog.open(tmp_path / "o").split("train")
    with pytest.raises(ShardError, match="no metadata.json"):
        ShardedLog.open(tmp_path / "missing")


def test_schema_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlabels: {click: binary}\ninteger: []\ncategorical: [C1]\nitem_id: C9\n")
    with pytest.raises(SchemaError, match=r"bad.yaml: item_id: 'C9'"):
        DatasetSchema.from_yaml(path)
    path.write_text("name: x\nlabels: {click: ordinal}\ninteger: []\ncategorical: []\n")
    with pytest.raises(SchemaError, match=r"labels.click"):
        DatasetSchema.from_yaml(path)
    path.write_text("name: x\nlabels: {click: binary}\ninteger: []\ncategorical: [C1]\nvocabulary: {hash_size: 1}\n")
    with pytest.raises(SchemaError, match=r"vocabulary.hash_size"):
        DatasetSchema.from_yaml(path)


def test_cli_preprocess_reports_without_a_traceback(tmp_path, capsys):
    from torchrec_mtl.cli import main

    path = _write(tmp_path / "l.tsv", [_good(i) for i in range(40)] + [_row(click="7")])
    args = ["preprocess", "--schema", "configs/datasets/synthetic.yaml", "--train", str(path), "--out"]
    assert main([*args, str(tmp_path / "strict"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "l.tsv:41: label not 0/1 (column click: '7')" in error and "Traceback" not in error
    assert main([*args, str(tmp_path / "ok"), "--test-fraction", "0.5", "--max-bad-fraction", "0.05"]) == 0
    assert "rows read 41 = written 40" in capsys.readouterr().err
    log = ShardedLog.open(tmp_path / "ok")
    assert log.rows("train") + log.rows("test") == 40 and log.rows("test") > 0


def test_a_schema_that_does_not_fit_the_file_stops_at_once_naming_file_line_and_counts(tmp_path):
    path = _write(tmp_path / "synthetic.tsv", [_good(i) for i in range(50)])
    criteo = DatasetSchema.from_yaml("configs/datasets/criteo_kaggle.yaml")
    strict = DatasetSchema.from_dict({**yaml.safe_load(open(criteo.source)), "pad_short_rows": False})
    with pytest.raises(TooManyBadRows, match=r"synthetic.tsv:1: too few fields \(24 fields, the schema has 40\)"):
        preprocess(strict, {"train": [path]}, tmp_path / "o", progress=False)
    # Criteo pads short rows, so the same file fails on the first column that is not what Criteo has there
    with pytest.raises(TooManyBadRows, match=r"synthetic.tsv:1: integer not valid \(column I2: '4.5'\)"):
        preprocess(criteo, {"train": [path]}, tmp_path / "o", progress=False)
    # the right field count but text where Criteo has integers: the column is named
    shifted = _write(tmp_path / "shifted.tsv", ["\t".join(["1", "ab", *(["3"] * 12), *(["a1"] * 26)])])
    with pytest.raises(TooManyBadRows, match=r"shifted.tsv:1: integer not valid \(column I1: 'ab'\)"):
        preprocess(criteo, {"train": [shifted]}, tmp_path / "o", progress=False)


def test_generated_criteo_log_is_repeatable_and_parses_cleanly_under_the_criteo_schema(tmp_path):
    from torchrec_mtl.data.criteo_format import write_criteo_log

    sizes = [write_criteo_log(tmp_path / f"{name}.tsv", 3000, seed=4, progress=False) for name in "ab"]
    assert sizes[0] == sizes[1] and (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    schema = DatasetSchema.from_yaml("configs/datasets/criteo_terabyte.yaml")
    gz = _write(tmp_path / "a.tsv.gz", (tmp_path / "a.tsv").read_text().splitlines(), compress=True)
    summary = preprocess(schema, {"train": [tmp_path / "a.tsv"], "test": [gz]}, tmp_path / "o", progress=False)
    assert summary.rows_written == {"train": 3000, "test": 3000} and summary.rows_rejected == 0
    train, test = (_all_rows(ShardedLog.open(tmp_path / "o"), split) for split in ("train", "test"))
    for a, b in zip(train, test, strict=False):
        if isinstance(a, dict):
            np.testing.assert_array_equal(a["click"], b["click"])
        else:
            np.testing.assert_array_equal(a, b)


def test_extreme_integer_features_follow_the_documented_rule():
    """log(1 + max(x, 0)): a negative count becomes 0, 1e18 becomes 41.4; past int64 the row is rejected."""
    from torchrec_mtl.data.preprocess import ChunkParser

    def line(first: str) -> str:
        return "\t".join(["1", "0", "4", first, "-5", "", *["0"] * 10, *["a1"] * 8])

    chunk = "\n".join([line("1000000000000000000"), line("99999999999999999999")]) + "\n"
    parsed = ChunkParser(SCHEMA, SCHEMA.columns).parse(chunk.encode(), 1)
    assert parsed.line_numbers.tolist() == [1]
    np.testing.assert_allclose(parsed.dense[0, :3], [np.log1p(1e18), 0.0, 0.0], rtol=1e-6)
    assert [(n, reason, column) for n, reason, column, _, _ in parsed.rejections] == [(2, "integer not valid", "I1")]
