"""The dataset converters' registry and ``torchrec-mtl convert``: the CLI writes what the converter writes, refuses a
missing source in one line, and never writes over a folder it did not write."""

from __future__ import annotations

import pytest

from conftest import REAL_DATA
from torchrec_mtl.cli import main
from torchrec_mtl.cli_args import DATASETS
from torchrec_mtl.data.mind import convert_mind
from torchrec_mtl.data.sources import SOURCES

MIND = REAL_DATA / "mind-small-subset"


def test_the_cli_offers_exactly_the_registered_converters():
    assert tuple(SOURCES) == DATASETS


@pytest.mark.skipif(not MIND.is_dir(), reason=f"the MIND subset is not at {MIND}")
def test_convert_writes_what_the_converter_writes(tmp_path):
    assert main(["convert", "mind", "--source", str(MIND), "--out", str(tmp_path / "cli")]) == 0
    convert_mind(MIND, tmp_path / "direct")
    for name in ("train.tsv", "test.tsv", "items.tsv"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name


def test_convert_refuses_a_missing_source_and_a_foreign_out_folder(tmp_path, capsys):
    assert main(["convert", "movielens", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder; expected ratings.csv" in capsys.readouterr().err
    (tmp_path / "empty_source").mkdir()
    assert main(["convert", "mind", "--source", str(tmp_path / "empty_source"), "--out", str(tmp_path / "o")]) == 2
    assert "behaviors.tsv" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    if MIND.is_dir():
        assert main(["convert", "mind", "--source", str(MIND), "--out", str(foreign)]) == 2
        assert "did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
