"""torchrec-mtl tune: each trial a real run scored on validation, a study that an interruption does not lose, and a
best config that train accepts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

import torchrec_mtl.run
from torchrec_mtl.cli import main
from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.tune import Dimension, read_space, tune

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mmoe_synthetic.yaml")
SPACE = "training.dense_lr: {low: 0.0005, high: 0.01, log: true}\nmodel.interaction.kind: {choices: [dot, concat]}\n"


def _overrides(small_log: Path) -> list:
    return [f"data.dir={small_log}", "data.generate=null", "model.text=null", "training.batch_size=2048",
            "training.curve_every=0", "data.validation_fraction=0.1", "training.epochs=1",
            "objective.gradient_cosine_every=0"]  # fmt: skip


def _trials(out: Path) -> list:
    with open(out / "trials.tsv") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_an_interrupted_study_continues_where_it_stopped_and_its_best_config_trains(
    small_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "tune"
    real_run_job, calls = torchrec_mtl.run.run_job, []

    def interrupted_second_run(*args, **kwargs):  # Ctrl-C after trial 1's run, before its score was recorded
        calls.append(1)
        results = real_run_job(*args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return results

    monkeypatch.setattr(torchrec_mtl.run, "run_job", interrupted_second_run)
    with pytest.raises(KeyboardInterrupt):
        tune(CONFIG, space, trials=2, out_dir=out, overrides=_overrides(small_log), progress=False)
    first = _trials(out)
    assert [row["state"] for row in first] == ["complete"]
    # trial 0 is the config as it is: its own dense_lr (0.002) and interaction (dot)
    assert float(first[0]["training.dense_lr"]) == 0.002 and first[0]["model.interaction.kind"] == "dot"

    monkeypatch.setattr(torchrec_mtl.run, "run_job", real_run_job)
    summary = tune(CONFIG, space, trials=2, out_dir=out, overrides=_overrides(small_log), progress=False)
    rows = _trials(out)
    assert [row["state"] for row in rows] == ["complete", "fail", "complete"]
    assert rows[0] == first[0]  # not run again
    interrupted, rerun = rows[1], rows[2]  # the interrupted trial's values, tried again first
    assert (interrupted["training.dense_lr"], interrupted["model.interaction.kind"]) == (
        rerun["training.dense_lr"], rerun["model.interaction.kind"])
    assert all((out / f"trial-{n:03d}" / "results.json").exists() for n in (0, 2))

    best = max((row for row in rows if row["score"]), key=lambda row: float(row["score"]))
    assert summary["best"]["trial"] == int(best["trial"])
    config = load_config(out / "best.yaml")
    assert config.training.dense_lr == pytest.approx(float(best["training.dense_lr"]))
    assert config.model.interaction.kind == best["model.interaction.kind"]
    assert config.data.validation_fraction == 0.1 and config.out_dir == str(out / "best")
    assert yaml.safe_load((out / "best.yaml").read_text())["include"] == [CONFIG]


def test_a_space_is_checked_against_the_config_before_any_trial(small_log: Path, tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("training.no_such_key: {low: 1, high: 2}\n")
    out = tmp_path / "tune"
    assert main(["tune", "--config", CONFIG, "--space", str(space), "--trials", "2", "--out", str(out),
                 *_overrides(small_log)]) == 2  # fmt: skip
    assert "training.no_such_key: unknown key" in capsys.readouterr().err and not out.exists()
    no_validation = [*_overrides(small_log), "data.validation_fraction=0", "training.early_stopping=null"]
    space.write_text(SPACE)
    assert main(["tune", "--config", CONFIG, "--space", str(space), "--trials", "2", "--out", str(out),
                 *no_validation]) == 2  # fmt: skip
    assert "tune scores trials on validation rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a.b: {low: 2, high: 1}\n", "expected finite numbers low < high"),
        ("a.b: {low: 0, high: 1, log: true}\n", "low > 0 with log: true"),
        ("a.b: {choices: []}\n", "choices: expected a non-empty list"),
        ("a.b: [1, 2]\n", "expected {low, high[, log]} or {choices: [...]}"),
        ("[]\n", "expected a mapping of config keys to ranges"),
    ],
)
def test_a_bad_space_names_its_key(tmp_path: Path, text: str, problem: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(text)
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("{", r"\{")):
        read_space(space)


def test_a_dimension_holds_the_configs_own_value_only_when_it_lies_in_it() -> None:
    assert Dimension("k", 1, 8).holds(4) and not Dimension("k", 1, 8).holds(4.5) and not Dimension("k", 1, 8).holds(9)
    assert Dimension("k", 0.001, 0.1, log=True).holds(0.002) and not Dimension("k", 0.001, 0.1).holds("x")
    assert Dimension("k", choices=["dot", "dcn"]).holds("dot") and not Dimension("k", choices=["dot"]).holds("dcn")
