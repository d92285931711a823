"""The README's example config loads as written (its includes resolved against configs/, where it says it lives)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from torchrec_mtl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_example_config_loads(tmp_path):
    block = re.search(r"```yaml\n(# configs/my_ple\.yaml\n.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    raw = yaml.safe_load(block)
    raw["include"] = [str(ROOT / "configs" / name) for name in raw["include"]]
    path = tmp_path / "my_ple.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert config.model.tower.kind == "ple" and config.model.tower.num_levels == 2
    assert config.model.interaction.kind == "dot" and config.training.early_stopping.patience == 2
    assert sorted(config.objective.tasks) == ["ctr", "cvr", "rating"]
