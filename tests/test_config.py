"""Invalid configs stop before any work with a message naming the key, and no traceback."""

from __future__ import annotations

import pytest

from torchrec_mtl.cli import main
from torchrec_mtl.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("training.epoch=2", "training.epoch", "allowed here"),
        ("training.batch_size=big", "training.batch_size", "expected int"),
        ("model.tower.num_experts=0", "model.tower.num_experts", "must be positive"),
        ("training.sharding_types=[diagonal]", "training.sharding_types[0]", "row_wise"),
        ("model.tower.kind=transformer", "model.tower.kind", "mmoe"),
        ("model.embedding_dim=32", "model.dense_arch_layer_sizes", "must equal"),
        ("objective.tasks.cvr.label=purchase", "objective.tasks.cvr.label", "its labels: click, conversion, rating"),
        ("objective.tasks.rating.kind=binary", "objective.tasks.rating.kind", "regression label"),
        ("objective.products.ctcvr.of=[ctr,rating]", "objective.products.ctcvr.of", "not binary tasks: ['rating']"),
        ("objective.tasks.cvr.given=rating", "objective.tasks.cvr.given", "not a binary task"),
        ("objective.tasks.extra={kind: binary}", "objective.tasks.extra.label", "missing"),
        ("data.generate.test_fraction=1.5", "data.generate", "test_fraction"),
        ("model.tower.num_levels=0", "model.tower.num_levels", "must be positive"),
        ("model.tower.gate_temperature=0", "model.tower.gate_temperature", "must be positive"),
        ("model.tower.expert_dropout=1", "model.tower.expert_dropout", "0 <= expert_dropout < 1"),
        ("model.tower.expert_layer_sizes=[]", "model.tower.expert_layer_sizes", "one or more"),
        ("data.test_fraction=1", "data.test_fraction", "0 <= test_fraction < 1"),
        ("objective.weighting=gradnorm2", "objective.weighting", "uncertainty"),
        ("training.lr_decay=exponential", "training.lr_decay", "cosine"),
        ("training.tables={C1: {compute_kernels: [magic]}}", "training.tables.C1.compute_kernels[0]", "fused"),
        ("checkpoint.keep=0", "checkpoint.keep", ">= 1"),
        ("checkpoint.resume=/no/such/checkpoint", "checkpoint.resume", "auto, never, or an existing checkpoint"),
        ("evaluation.threshold=1.5", "evaluation.threshold", "strictly between 0 and 1, best_f1"),
        ("evaluation.threshold=best", "evaluation.threshold", "strictly between 0 and 1, best_f1"),
        ("evaluation.threshold=[0.5]", "evaluation.threshold", "expected float or str"),
        (("data.validation_fraction=0", "training.early_stopping=null", "evaluation.threshold=best_f1"),
         "evaluation.threshold", "data.validation_fraction is 0"),  # fmt: skip
        (("data.validation_fraction=0", "training.early_stopping={}"), "training.early_stopping",
         "data.validation_fraction is 0"),  # fmt: skip
        ("training.early_stopping.every_steps=-1", "training.early_stopping", "every_steps >= 0"),
        ("data.validation_fraction=0.5", "data.validation_fraction", "0 <= validation_fraction < 0.5"),
    ],
)
def test_invalid_config_names_the_key(override, key, allowed, capsys):
    overrides = override if isinstance(override, tuple) else (override,)
    code = main(["train", "--config", "configs/mmoe_synthetic.yaml", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert key in err and allowed in err, err
    assert "Traceback" not in err


def test_shipped_config_loads_with_overrides():
    config = load_config("configs/mmoe_synthetic.yaml", ["training.epochs=3", "training.sharding_types=[row_wise]"])
    assert config.training.epochs == 3 and config.training.sharding_types == ["row_wise"]
    assert config.data.generate.num_rows == 3_000_000 and config.model.tower.kind == "mmoe"


def test_the_generate_section_mirrors_the_generator_config():
    """config.sections imports nothing from the package, so data.generate is its own copy of SyntheticConfig."""
    import dataclasses

    from torchrec_mtl.config import DataConfig, GenerateConfig, synthetic_config
    from torchrec_mtl.data.synthetic import SyntheticConfig

    def shape(cls):
        return [(f.name, str(f.type), f.default) for f in dataclasses.fields(cls)]

    assert shape(GenerateConfig) == shape(SyntheticConfig)
    section = GenerateConfig(num_rows=10, seed=3)
    converted = synthetic_config(DataConfig(generate=section))
    assert converted == SyntheticConfig(num_rows=10, seed=3)
    assert dataclasses.asdict(converted) == dataclasses.asdict(section)  # what meta.json's config is compared with


@pytest.mark.parametrize("kind", ["single_task", "shared_bottom", "mmoe", "ple"])
def test_every_tower_kind_builds_from_config(kind):
    import torch

    from torchrec_mtl.build import build_tower

    config = load_config("configs/mmoe_synthetic.yaml", [f"model.tower.kind={kind}", "model.tower.num_levels=2"])
    tower = build_tower(config.model.tower, 24, ["ctr", "cvr"])
    logits = tower(torch.randn(5, 24))
    assert list(logits) == ["ctr", "cvr"] and logits["cvr"].shape == (5,)


@pytest.mark.parametrize(
    "path",
    ["configs/mmoe_synthetic.yaml", "configs/ple_synthetic.yaml", "configs/mmoe_movielens.yaml",
     "configs/mmoe_mind.yaml", "configs/mmoe_criteo_kaggle.yaml"],
)  # fmt: skip
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.objective.tasks["ctr"].label == "click"


def test_a_config_is_composed_from_its_includes_and_overrides_them(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "model.yaml").write_text("model: {embedding_dim: 8, dense_arch_layer_sizes: [8], tower: {kind: ple}}\n")
    (tmp_path / "parts" / "train.yaml").write_text("training: {epochs: 3, batch_size: 64}\n")
    (tmp_path / "job.yaml").write_text("include: [parts/model.yaml, parts/train.yaml]\ntraining: {epochs: 2}\n")
    config = load_config(tmp_path / "job.yaml", ["model.tower.num_levels=2", "model.text=null"])
    assert (config.model.embedding_dim, config.model.tower.kind, config.model.tower.num_levels) == (8, "ple", 2)
    assert (config.training.epochs, config.training.batch_size) == (2, 64)  # the file over its includes


@pytest.mark.parametrize(
    "text, message",
    [
        ("include: [parts/none.yaml]", r"include\[0\]: .*parts/none.yaml: no such config file"),
        ("include: parts/none.yaml", "include: expected a list of config files"),
        ("include: [job.yaml]", "includes itself"),
    ],
)
def test_a_broken_include_is_refused_naming_it(tmp_path, text, message):
    (tmp_path / "job.yaml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "job.yaml")
