"""The README's example config loads as written, from configs/ where it says it lives (a copy of the folder)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from torchrec_mtl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_example_config_loads(tmp_path):
    block = re.search(r"```yaml\n(# configs/my_ple\.yaml\n.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    path = tmp_path / "configs" / "my_ple.yaml"
    path.write_text(block)
    config = load_config(path)
    assert config.out_dir == str(tmp_path / "runs" / "my_ple")  # paths resolve against the config's folder
    assert config.data.schema == str(tmp_path / "configs" / "datasets" / "synthetic.yaml")
    assert config.model.tower.kind == "ple" and config.model.tower.num_levels == 2
    assert config.model.interaction.kind == "dot" and config.training.early_stopping.patience == 2
    assert sorted(config.objective.tasks) == ["ctr", "cvr", "rating"]
