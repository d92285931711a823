"""Paths in a config resolve against the file that sets them, and every input is checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.run.prepare import check_inputs

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A config outside the repo, with an included part in a subfolder and a copy of the synthetic schema."""
    _write(tmp_path / "exp/schemas/synthetic.yaml", (REPO / "configs/datasets/synthetic.yaml").read_text())
    _write(tmp_path / "exp/parts/data.yaml", "data:\n  dir: ../logs\n  schema: ../schemas/synthetic.yaml\n")
    _write(tmp_path / "exp/logs/train.tsv", "")
    _write(tmp_path / "exp/logs/test.tsv", "")
    _write(tmp_path / "exp/logs/items.tsv", "")
    return _write(tmp_path / "exp/job.yaml", "include: [parts/data.yaml]\nout_dir: runs/job\n")


def test_paths_resolve_against_the_file_that_sets_them_from_any_working_directory(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(project)
    assert config.data.dir == str(tmp_path / "exp/logs")  # set in parts/data.yaml: against parts/
    assert config.data.schema == str(tmp_path / "exp/schemas/synthetic.yaml")
    assert config.out_dir == str(tmp_path / "exp/runs/job")  # set in job.yaml: against its folder
    assert config.data.train == ["train.tsv"]  # relative to data.dir, as before
    check_inputs(config)  # every input is there


def test_command_line_paths_stay_relative_to_the_working_directory(project: Path) -> None:
    config = load_config(project, ["out_dir=runs/other", "data.dir=/abs/logs"])
    assert (config.out_dir, config.data.dir) == ("runs/other", "/abs/logs")


def test_resume_keywords_are_not_paths(project: Path, tmp_path: Path) -> None:
    _write(tmp_path / "exp/resume.yaml", "include: [job.yaml]\ncheckpoint: {resume: never}\n")
    assert load_config(tmp_path / "exp/resume.yaml").checkpoint.resume == "never"
    (tmp_path / "exp/old/step-1").mkdir(parents=True)
    _write(tmp_path / "exp/resume.yaml", "include: [job.yaml]\ncheckpoint: {resume: old/step-1}\n")
    assert load_config(tmp_path / "exp/resume.yaml").checkpoint.resume == str(tmp_path / "exp/old/step-1")


@pytest.mark.parametrize("config_file", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_finds_its_schema_and_writes_under_the_repos_runs_from_any_folder(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    config = load_config(config_file)
    assert Path(config.data.schema).is_file(), config.data.schema
    assert Path(config.out_dir).parent == REPO / "runs"


@pytest.mark.parametrize(
    "change, key",
    [
        ("data.schema=/nowhere/schema.yaml", "data.schema: /nowhere/schema.yaml does not exist"),
        ("data.dir=/nowhere", "data.dir: /nowhere does not exist"),
        ("data.train=[missing_*.tsv]", "data.train: 'missing_*.tsv' matches no file"),
        ("model.text.encoder=/nowhere/bert", "model.text.encoder: /nowhere/bert does not exist"),
    ],
)
def test_a_missing_input_is_named_before_any_work(project: Path, change: str, key: str) -> None:
    config = load_config(project, [change])
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("*", r"\*")):
        check_inputs(config)


def test_a_missing_items_file_is_named_unless_the_log_is_generated(project: Path, tmp_path: Path) -> None:
    (tmp_path / "exp/logs/items.tsv").unlink()
    with pytest.raises(ConfigError, match="model.text.items: .*items.tsv does not exist"):
        check_inputs(load_config(project, ["model.text={}"]))
    check_inputs(load_config(project))  # no item text
