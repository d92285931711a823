"""The package as pip installs it: the wheel carries every module, every config of configs/ (as torchrec_mtl/configs)
and the torchrec-mtl entry point; `torchrec-mtl configs` lists the shipped configs and `--copy` writes them out
without overwriting a file it did not write. How the dependencies are declared: docs/install.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from torchrec_mtl.cli import main
from torchrec_mtl.shipped import copy_configs, describe, shipped_files

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(path.relative_to(ROOT / "configs")) for path in (ROOT / "configs").rglob("*.yaml"))


def test_pyproject_lists_every_package_folder_and_maps_configs_into_the_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "torchrec_mtl").rglob("__init__.py")
    }
    shipped = {"torchrec_mtl.configs", *(f"torchrec_mtl.configs.{path.name}" for path in (ROOT / "configs").iterdir()
                                         if path.is_dir())}  # fmt: skip
    assert set(setuptools["packages"]) == folders | shipped
    assert setuptools["package-dir"] == {"torchrec_mtl.configs": "configs"}
    assert set(setuptools["package-data"]) == shipped


def test_every_shipped_file_is_listed_with_the_comment_line_it_starts_with(capsys):
    files = shipped_files()
    assert sorted(shipped.relative for shipped in files) == CONFIGS
    for shipped in files:
        first = (ROOT / "configs" / shipped.relative).read_text().splitlines()[0]
        assert first.startswith("# ") and shipped.description == first[2:].strip(), shipped.relative
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for shipped in files:
        assert f"  {shipped.relative}" in out and shipped.description in out


def test_describe_takes_the_first_comment_line():
    assert describe("model:\n  # the tower\n  kind: mmoe  # or ple\n") == "the tower"
    assert describe("a: 1\n") == ""


def test_copy_writes_the_tree_again_as_a_no_op_and_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    assert main(["configs", "--copy", str(tmp_path)]) == 0
    copied = tmp_path / "configs"
    assert sorted(str(path.relative_to(copied)) for path in copied.rglob("*.yaml")) == CONFIGS
    for name in CONFIGS:
        assert (copied / name).read_bytes() == (ROOT / "configs" / name).read_bytes(), name
    assert f"wrote {len(CONFIGS)} files into {copied}" in capsys.readouterr().out
    (copied / "mine.yaml").write_text("include: [mmoe_synthetic.yaml]\n")  # a user's own config beside them
    assert main(["configs", "--copy", str(tmp_path)]) == 0
    assert f"({len(CONFIGS)} already there, unchanged)" in capsys.readouterr().out
    # an edited file, and a removed one: the copy is refused whole, before anything is written
    (copied / "parts" / "training.yaml").write_text("training: {epochs: 3}\n")
    (copied / "datasets" / "mind.yaml").unlink()
    assert main(["configs", "--copy", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "parts/training.yaml already exists and is not the shipped file; nothing was written" in err
    assert (copied / "parts" / "training.yaml").read_text() == "training: {epochs: 3}\n"
    assert not (copied / "datasets" / "mind.yaml").exists()
    assert (copied / "mine.yaml").exists()
    assert not [path for path in copied.rglob("*") if path.name.endswith(".partial")]


def test_copy_into_a_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "configs").write_text("not a folder\n")
    with pytest.raises(ValueError, match="configs is a file; expected a folder"):
        copy_configs(tmp_path)
    (tmp_path / "configs").unlink()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "parts").write_text("not a folder\n")
    with pytest.raises(ValueError, match="parts is a file; expected a folder"):
        copy_configs(tmp_path)
    assert [path.name for path in (tmp_path / "configs").iterdir()] == ["parts"]


def test_the_wheel_carries_every_module_config_and_the_entry_point_and_lists_its_own_configs(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    for folder in ("torchrec_mtl", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "-w", str(tmp_path / "dist"), str(source)]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("torchrec_mtl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        assert "torchrec-mtl = torchrec_mtl.cli:main" in archive.read(entry_points).decode()
        archive.extractall(tmp_path / "installed")
    for name in CONFIGS:
        assert f"torchrec_mtl/configs/{name}" in names, name
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "torchrec_mtl").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    # the entry point run from the unpacked wheel alone (not this clone) lists the wheel's configs
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "installed")}
    code = "import sys; from torchrec_mtl.cli import main; sys.exit(main(['configs']))"
    listed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert f"(in {tmp_path / 'installed' / 'torchrec_mtl' / 'configs'})" in listed.stdout
    for name in CONFIGS:
        assert f"  {name}" in listed.stdout, name
