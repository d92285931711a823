"""Lines longer than the configured limit (``max_line_bytes``, ``--max-line-bytes``, ``data.max_line_bytes``): rejected
as "line too long" while they stream by, never read whole; the line numbers after them stay exact."""

from __future__ import annotations

import gzip

import numpy as np
import polars as pl
import pytest

from test_preprocess import SCHEMA, _all_rows, _good, _row
from torchrec_mtl.data.preprocess import LogFormatError, preprocess
from torchrec_mtl.data.shards import ShardedLog
from torchrec_mtl.schema import DatasetSchema
from conftest import ONE_PASS


def test_a_line_too_long_is_rejected_as_it_streams_by_and_the_next_line_numbers_stay_exact(tmp_path):
    import tracemalloc

    lines = [_good(i) for i in range(30)]
    lines[20] = _row(click="x")  # line 22 of the file, after the long one
    path = tmp_path / "long.tsv"
    text = "".join(line + "\n" for line in lines)
    head, tail = text.split("\n", 10)[:10], text.split("\n", 10)[10]
    path.write_bytes(("\n".join(head) + "\n1\t0\t").encode() + b"7" * (5 << 20) + b"\n" + tail.encode())
    tracemalloc.start()
    try:
        summary = preprocess(SCHEMA, {"train": [path]}, tmp_path / "out", chunk_bytes=16 << 10,
                             max_line_bytes=64 << 10, max_bad_fraction=1.0, progress=False)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.rows_read == 31 and summary.total_written == 29
    assert summary.rejected == {"line too long": 1, "label not 0/1": 1}
    rejects = pl.read_csv(tmp_path / "out" / "rejects.tsv", separator="\t", quote_char=None, infer_schema=False)
    assert rejects["line"].cast(int).to_list() == [11, 22] and rejects["reason"][0] == "line too long"
    assert rejects["value"][0] == f"{4 + (5 << 20):,} bytes, limit 65,536"
    assert rejects["raw_line"][0].startswith("1\\t0\\t777") and rejects["raw_line"][0].endswith(" more bytes)")
    # held whole, the 5 MiB line took 31 MiB (copies while it was gathered, then parsed); skipped, a chunk's worth
    assert peak < 2 << 20, f"peak {peak:,} bytes traced"
    dense, _, _ = _all_rows(ShardedLog.open(tmp_path / "out"), "train")
    kept = [i for i in range(30) if i != 20]
    np.testing.assert_allclose(np.expm1(dense[:, 0]), kept, rtol=1e-5)


def test_lines_too_long_in_a_header_file_and_at_the_end_without_a_line_end(tmp_path):
    schema = DatasetSchema.from_dict(
        {"name": "t", "labels": {"y": "binary"}, "integer": ["n"], "categorical": ["c"], "header": True}
    )
    path = tmp_path / "h.tsv"
    path.write_text("c\ty\tn\nab\t1\t4\n" + "ab\t1\t" + "4" * 100 + "\nab\t0\t5\n" + "c" * 500)  # no final line end
    summary = preprocess(schema, {"train": [path]}, tmp_path / "o", chunk_bytes=64, max_line_bytes=99,
                         max_bad_fraction=1, progress=False)  # fmt: skip
    assert summary.rows_read == 4 and summary.total_written == 2 and summary.rejected == {"line too long": 2}
    rejects = pl.read_csv(tmp_path / "o" / "rejects.tsv", separator="\t", quote_char=None, infer_schema=False)
    assert rejects["line"].cast(int).to_list() == [3, 5]
    assert rejects["value"].to_list() == ["105 bytes, limit 99", "500 bytes, limit 99"]
    path.write_text("c\ty\tn\t" + "x" * 200 + "\nab\t1\t4\n")
    with pytest.raises(LogFormatError, match=r"h.tsv:1: the header is too long \(206 bytes, limit 99\)"):
        preprocess(schema, {"train": [path]}, tmp_path / "o2", max_line_bytes=99, progress=False)


@pytest.mark.parametrize("compress", [False, True])
def test_read_chunks_gives_every_line_or_a_stand_in_whatever_the_chunk_size(tmp_path, compress):
    """Each line comes back whole, or, when longer than the limit, as an empty stand-in with its length; every
    chunk is whole lines of at most chunk_bytes + max_line_bytes (+ the stand-in's line end) bytes."""
    import random

    from torchrec_mtl.data.preprocess import read_chunks

    rng = random.Random(7)
    path = tmp_path / "log"
    for _ in range(300):
        lines = [bytes(rng.choice(b"ab\r\t") for _ in range(rng.choice([0, 1, 3, 5, 8, 20, 40])))
                 for _ in range(rng.randint(0, 12))]  # fmt: skip
        data = b"".join(line + b"\n" for line in lines)
        if lines and lines[-1] and rng.random() < 0.5:
            data = data[:-1]  # a last line without its line end
        path.write_bytes(gzip.compress(data) if compress else data)
        limit, chunk_bytes = rng.choice([1, 2, 4, 6, 10, 30]), rng.choice([1, 2, 3, 7, 16, 100])
        got, long_lines, first = [], [], 1
        for chunk, _, too_long in read_chunks(path, chunk_bytes, limit):
            assert chunk.endswith(b"\n") and len(chunk) <= chunk_bytes + limit + 1
            chunk_lines = chunk.split(b"\n")[:-1]
            for t in too_long:
                assert chunk_lines[t.index] == b""
                long_lines.append((first + t.index, t.length))
            got += chunk_lines
            first += len(chunk_lines)
        assert got == [line if len(line) <= limit else b"" for line in lines], (data, limit, chunk_bytes)
        assert long_lines == [(n, len(line)) for n, line in enumerate(lines, start=1) if len(line) > limit]


def test_a_job_rejects_lines_over_its_limit_and_reuses_its_shards_until_the_limit_changes(small_log, tmp_path):
    from torchrec_mtl.config import load_config
    from torchrec_mtl.data.prepare import prepare_shards

    lines = (small_log / "train.tsv").read_text().splitlines(keepends=True)[:500]
    (tmp_path / "train.tsv").write_text("".join(lines[:100]) + "1\t" * 3000 + "\n" + "".join(lines[100:]))
    (tmp_path / "test.tsv").write_text("".join(lines[:50]))
    overrides = [f"data.dir={tmp_path}", "data.generate=null", *ONE_PASS, "data.max_bad_fraction=0.1"]
    log = prepare_shards(load_config("configs/mmoe_synthetic.yaml", overrides + ["data.max_line_bytes=4096"]).data,
                         progress=False)  # fmt: skip
    assert log.metadata["counts"]["rejected_by_reason"] == {"line too long": 1}
    stamp = (tmp_path / "shards" / "metadata.json").stat().st_mtime_ns
    prepare_shards(load_config("configs/mmoe_synthetic.yaml", overrides + ["data.max_line_bytes=4096"]).data,
                   progress=False)  # fmt: skip
    assert (tmp_path / "shards" / "metadata.json").stat().st_mtime_ns == stamp, "the same limit: reused"
    log = prepare_shards(load_config("configs/mmoe_synthetic.yaml", overrides).data, progress=False)
    assert log.metadata["counts"]["rejected_by_reason"] == {"too many fields": 1}, "the default limit: preprocessed"
