"""Nothing a run did not write is deleted or overwritten: the output writers of torchrec_mtl.outputs, and the
values that would reach float32 or a cache as non-finite. Real folders and files, real preprocessing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from torchrec_mtl.cli import main
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.outputs import MARKER, OutputError, claim_folder, new_file, new_folder
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.text.cache import ItemTextCache, TextCacheError
from conftest import ONE_PASS

SCHEMA = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def logs(small_log, tmp_path) -> Path:
    """A user's folder: two logs and their notes."""
    folder = tmp_path / "my_logs"
    folder.mkdir()
    for name in ("train.tsv", "test.tsv"):
        lines = (small_log / name).read_text().splitlines(keepends=True)[:2000]
        (folder / name).write_text("".join(lines))
    (folder / "notes.txt").write_text("mine\n")
    return folder


def test_preprocess_into_the_folder_of_its_own_logs_is_refused_and_deletes_nothing(logs, capsys):
    before = _tree(logs)
    code = main(["preprocess", "--schema", "configs/datasets/synthetic.yaml", "--train", str(logs / "train.tsv"),
                 "--out", str(logs), "--quiet"])  # fmt: skip
    assert code == 2
    assert "is or holds an input of this run" in capsys.readouterr().err
    assert _tree(logs) == before


def test_a_job_whose_shards_folder_is_its_data_folder_is_refused_and_deletes_nothing(logs, tmp_path, capsys):
    before = _tree(logs)
    code = main(["train", "--config", "configs/mmoe_synthetic.yaml", f"data.dir={logs}", "data.generate=null", *ONE_PASS,
                 f"data.shards={logs}", f"out_dir={tmp_path / 'run'}", "model.text=null"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "data.shards" in err and "input" in err, err
    assert _tree(logs) == before


def test_new_shards_replace_earlier_shards_of_ours_but_never_a_foreign_folder(logs, tmp_path):
    files = {"train": [logs / "train.tsv"], "test": [logs / "test.tsv"]}
    out = tmp_path / "shards"
    preprocess(SCHEMA, files, out, progress=False)
    first = json.loads((out / "metadata.json").read_text())
    (out / "train" / "stale.npy").write_bytes(b"left from before")
    preprocess(SCHEMA, files, out, progress=False)
    assert json.loads((out / "metadata.json").read_text())["counts"] == first["counts"]
    assert not (out / "train" / "stale.npy").exists(), "the folder is replaced whole, not merged"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary folder is left"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="did not write"):
        preprocess(SCHEMA, files, foreign, progress=False)
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_two_preprocess_runs_into_one_folder_at_once_both_finish_and_leave_whole_shards(logs, tmp_path):
    files = {"train": [logs / "train.tsv"], "test": [logs / "test.tsv"]}
    out, errors = tmp_path / "shards", []

    def run() -> None:
        try:
            preprocess(SCHEMA, files, out, progress=False, chunk_bytes=1 << 14)
        except Exception as error:  # noqa: BLE001 (collected and asserted below)
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["counts"]["rows_read"] == 4000 == metadata["counts"]["rows_written"]
    shards = [out / split / f"{s['name']}.sparse.npy" for split in ("train", "test")
              for s in metadata["splits"][split]["shards"]]  # fmt: skip
    assert sum(len(np.load(path)) for path in shards) == 4000


def test_new_folder_keeps_nothing_of_a_failed_write_and_an_unmarked_folder_of_known_names_counts_as_ours(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with new_folder(target, "export") as work:
            (work / "model.pt").write_bytes(b"half")
            raise RuntimeError("the export failed")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "model.pt").write_bytes(b"an export written before markers existed")
    (target / "manifest.json").write_text("{}")
    with new_folder(target, "export") as work:
        (work / "model.pt").write_bytes(b"new")
    assert (target / "model.pt").read_bytes() == b"new" and (target / MARKER).is_file()
    with pytest.raises(OutputError, match="did not write"):  # a folder of ours, but of another kind
        with new_folder(target, "vectors"):
            pass


def test_a_run_folder_is_claimed_only_when_new_empty_or_ours(tmp_path):
    assert claim_folder(tmp_path / "run", "run") == tmp_path / "run"
    (tmp_path / "run" / "results.json").write_text("{}")
    claim_folder(tmp_path / "run", "run")  # ours: marked when first claimed
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("alias ll='ls -l'")
    with pytest.raises(OutputError, match="did not write"):
        claim_folder(tmp_path / "home", "run")
    with pytest.raises(OutputError, match="is a file"):
        claim_folder(tmp_path / "home" / ".bashrc", "run")
    with pytest.raises(OutputError, match="lies under"):
        claim_folder(tmp_path / "home" / ".bashrc" / "run", "run")


def test_new_file_replaces_only_a_file_of_its_own_kind_and_never_an_input(tmp_path):
    scores = tmp_path / "scores.tsv"
    with new_file(scores, ours_if_starts_with="line\t") as handle:
        handle.write("line\tctr\n1\t0.5\n")
    with new_file(scores, ours_if_starts_with="line\t") as handle:
        handle.write("line\tctr\n1\t0.25\n")
    assert scores.read_text() == "line\tctr\n1\t0.25\n"
    log = tmp_path / "log.tsv"
    log.write_text("1\t0\n")
    with pytest.raises(OutputError, match="not a file torchrec-mtl wrote"):
        with new_file(log, ours_if_starts_with="line\t"):
            pass
    with pytest.raises(OutputError, match="is an input"):
        with new_file(scores, inputs=[scores], ours_if_starts_with="line\t"):
            pass
    assert log.read_text() == "1\t0\n" and sorted(p.name for p in tmp_path.iterdir()) == ["log.tsv", "scores.tsv"]


def test_a_rating_finite_in_float64_but_not_in_float32_is_rejected_and_the_metadata_is_strict_json(logs, tmp_path):
    row = (logs / "train.tsv").read_text().splitlines()[0].split("\t")
    row[2] = "1e39"  # the rating: +inf once stored as float32
    log = tmp_path / "huge.tsv"
    log.write_text((logs / "train.tsv").read_text() + "\t".join(row) + "\n")
    summary = preprocess(SCHEMA, {"train": [log]}, tmp_path / "shards", progress=False)
    assert summary.rejected == {"label not a number": 1}
    text = (tmp_path / "shards" / "metadata.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metadata.json"))


def test_the_text_cache_refuses_a_non_finite_vector_and_names_the_item(tmp_path):
    class Encoder:
        identity, dim, last_sentences_per_s = "test-encoder", 4, 0.0

        def encode(self, texts, progress=False):
            vectors = np.ones((len(texts), 4), dtype=np.float32)
            vectors[texts.index("broken text")] = np.nan
            return vectors

    cache = tmp_path / "cache.npz"
    with pytest.raises(TextCacheError, match=r"item 'b2' has a non-finite vector"):
        ItemTextCache(cache).update({"a1": "fine text", "b2": "broken text"}, Encoder(), progress=False)
    assert not cache.exists(), "nothing is written"
    # a cache written by another tool with a NaN inside is refused when read
    meta = json.dumps({"format": 1, "identity": "x", "dim": 2, "count": 2})
    vectors = np.array([[1.0, 2.0], [np.nan, 0.0]], dtype=np.float32)
    np.savez(cache, ids=np.array(["a1", "b2"]), hashes=np.array(["h", "h"]), vectors=vectors, meta=np.array(meta))
    with pytest.raises(TextCacheError, match=r"item 'b2' has a non-finite vector"):
        ItemTextCache(cache)
