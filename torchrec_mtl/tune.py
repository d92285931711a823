"""Hyperparameter search over any config keys: ``torchrec-mtl tune --config X --space space.yaml --trials N``.

Each trial is an ordinary run (torchrec_mtl.run.run_job) of the config with the trial's values as overrides, into
``<out>/trial-NNN``, scored by its validation metric: ``training.early_stopping``'s (``mean_auc`` when the config
has none; then every epoch is validated and the best one kept), on ``data.validation`` or
``data.validation_fraction``, never on the test rows. Optuna's TPE sampler (seeded by ``training.seed``) proposes
the values; its median pruner stops a trial whose validation score after an epoch falls below the median of the
earlier trials' scores after that epoch. Trial 0 is the config as it is (its own values of the searched keys), so
the best trial is never worse than the config on validation.

The study lives in ``<out>/study.db`` (SQLite): the same command continues it, and a trial that an interruption left
unfinished is run again with the same values. Written as it goes: ``<out>/trials.tsv`` (a row per trial) and
``<out>/best.yaml`` (the config with the best trial's values, which ``train`` accepts as it is). One process.

A space file maps dotted config keys to what to try::

    training.dense_lr: {low: 0.0003, high: 0.01, log: true}
    training.embedding_lr: {low: 0.01, high: 0.2, log: true}
    model.tower.num_experts: {low: 2, high: 8}          # integer bounds: integer values
    model.interaction.kind: {choices: [dot, concat, dcn]}

Example::

    >>> summary = tune("configs/mmoe_movielens.yaml", "space.yaml", trials=20, out_dir="runs/tune")  # doctest: +SKIP
    >>> summary["best"]["params"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from tqdm import tqdm

from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.outputs import claim_folder, new_file
from torchrec_mtl.progress import bar_disabled
from torchrec_mtl.yaml_files import YamlFileError, read_yaml

TRIALS_HEADER = "trial\tstate\tscore\tseconds"  # trials.tsv starts so: a file that does is one of ours


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched key: a range (``low``..``high``, on a log scale when ``log``; integers when both bounds are) or
    a list of ``choices``."""

    key: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Optional[List[Any]] = None

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (the config's own) lies in this dimension, so trial 0 can take it."""
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and value != int(value)):
            return False
        return self.low <= value <= self.high


def read_space(path: str | os.PathLike) -> List[Dimension]:
    """The dimensions of a space file; a ConfigError names the key and what is wrong with it."""
    try:
        raw = read_yaml(path, "search space")
    except YamlFileError as error:
        raise ConfigError(str(error)) from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of config keys to ranges, e.g. training.dense_lr: "
                          "{low: 0.0003, high: 0.01, log: true}")  # fmt: skip
    dimensions = []
    for key, spec in raw.items():
        where = f"{path}: {key}"
        if not isinstance(spec, dict) or not (set(spec) <= {"low", "high", "log", "choices"}):
            raise ConfigError(f"{where}: expected {{low, high[, log]}} or {{choices: [...]}}, got {spec!r}")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}: choices: expected a non-empty list and nothing else, got {spec!r}")
            dimensions.append(Dimension(str(key), choices=list(spec["choices"])))
            continue
        low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        if not numbers or not low < high or not isinstance(log, bool) or (log and low <= 0):
            raise ConfigError(f"{where}: expected finite numbers low < high (low > 0 with log: true), got {spec!r}")
        dimensions.append(Dimension(str(key), low, high, log))
    return dimensions


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _value_of(config: Any, key: str) -> Any:
    """The value of a dotted key in a loaded JobConfig (None where the path does not exist)."""
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def _nested(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        *sections, last = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return out


def tune(
    config_path: str | os.PathLike,
    space_path: str | os.PathLike,
    trials: int,
    out_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> Dict[str, Any]:
    """Run (or continue) the study until it holds ``trials`` finished trials (complete or pruned); write
    ``trials.tsv`` and ``best.yaml`` into ``out_dir``; return ``{"trials": [...], "best": {...}}``."""
    import optuna

    from torchrec_mtl.run import run_job

    config_path = Path(config_path).absolute()
    base = load_config(config_path, overrides)
    if base.data.validation_fraction == 0 and not base.data.validation:
        raise ConfigError(f"{config_path}: tune scores trials on validation rows: set data.validation_fraction "
                          "(e.g. 0.1) or data.validation files")  # fmt: skip
    fixed = list(overrides)
    if base.training.early_stopping is None:  # validate every epoch, keep the best, never stop early
        fixed.append(f"training.early_stopping={{metric: mean_auc, patience: {base.training.epochs}}}")
    metric = base.training.early_stopping.metric if base.training.early_stopping else "mean_auc"
    space = read_space(space_path)
    for dimension in space:  # a key the config does not have fails here, before any trial
        sample = dimension.choices[0] if dimension.choices is not None else dimension.low
        load_config(config_path, [*fixed, _override(dimension.key, sample)])
    out = claim_folder(out_dir, "tune", inputs=[config_path, space_path], option="--out")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tune", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=base.training.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
    )  # fmt: skip
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # an interrupted run: failed, and its values tried again first
        study._storage.set_trial_state_values(stale._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(stale.params)
    if not study.trials:
        study.enqueue_trial({d.key: _value_of(base, d.key) for d in space if d.holds(_value_of(base, d.key))})

    def finished() -> int:
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return sum(t.state in done for t in study.get_trials(deepcopy=False))

    with tqdm(total=trials, initial=min(finished(), trials), desc="tune", unit="trial", file=sys.stderr,
              disable=bar_disabled(progress)) as bar:  # fmt: skip
        while finished() < trials:
            trial = study.ask()
            params = {d.key: d.suggest(trial) for d in space}
            trial_overrides = [*fixed, *(_override(k, v) for k, v in params.items()),
                               f"out_dir={out / f'trial-{trial.number:03d}'}", "training.progress=false"]  # fmt: skip
            started = time.perf_counter()

            def report(point: int, score: float, trial: Any = trial) -> None:
                trial.report(score, point)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            score, state = None, optuna.trial.TrialState.COMPLETE
            try:  # the trial's own output goes to its train.log
                with contextlib.redirect_stdout(io.StringIO()):
                    results = run_job(load_config(config_path, trial_overrides), on_validation=report)
                score = results["training"]["selected"]["score"]
            except optuna.TrialPruned:
                state = optuna.trial.TrialState.PRUNED
            except (ConfigError, RuntimeError) as error:  # e.g. a non-finite loss at a wild learning rate
                state = optuna.trial.TrialState.FAIL
                print(f"trial {trial.number} failed: {error}", file=sys.stderr)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
            study.tell(trial, score, state=state)
            _write_outputs(study, out, config_path, fixed, metric)
            bar.update(1)
            bar.write(_trial_line(study, trial.number, metric))
    return _write_outputs(study, out, config_path, fixed, metric)


def _trial_line(study: Any, number: int, metric: str) -> str:
    trial = study.trials[number]
    score = f"{metric} {abs(trial.value):.4f}" if trial.value is not None else trial.state.name.lower()
    best = study.best_trial if any(t.value is not None for t in study.trials) else None
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {number}: {score}" + (f" (best {abs(best.value):.4f}, trial {best.number})" if best else "") + (
        f": {values}" if values else ": the config as it is")


def _write_outputs(study: Any, out: Path, config_path: Path, fixed: List[str], metric: str) -> Dict[str, Any]:
    """trials.tsv and best.yaml as the study stands; the same as a dict."""
    keys = sorted({key for t in study.trials for key in t.params})
    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name.lower(), "score": t.value,
                     "seconds": t.user_attrs.get("seconds"), "params": dict(t.params)})  # fmt: skip
    with new_file(out / "trials.tsv", ours_if_starts_with=TRIALS_HEADER, option="--out") as handle:
        handle.write("\t".join([TRIALS_HEADER, *keys]) + "\n")
        for row in rows:
            cells = [row["trial"], row["state"], "" if row["score"] is None else f"{abs(row['score']):.6f}",
                     row["seconds"] or "", *(row["params"].get(k, "") for k in keys)]  # fmt: skip
            handle.write("\t".join(map(str, cells)) + "\n")
    summary: Dict[str, Any] = {"metric": metric, "trials": rows, "best": None}
    scored = [t for t in study.trials if t.value is not None]
    if scored:
        best = max(scored, key=lambda t: t.value)
        fixed_values = {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in fixed)}
        document = {"include": [str(config_path)], **_nested({**fixed_values, **best.params}),
                    "out_dir": str(out / "best")}  # fmt: skip
        header = (f"# tune's best trial ({best.number}: validation {metric} {abs(best.value):.4f}) of {len(rows)}: "
                  f"the config {config_path.name} with these values; train it with\n"
                  f"#   torchrec-mtl train --config {out / 'best.yaml'}\n")  # fmt: skip
        with new_file(out / "best.yaml", ours_if_starts_with="# tune's best trial", option="--out") as handle:
            handle.write(header + yaml.safe_dump(document, sort_keys=False))
        summary["best"] = {"trial": best.number, "score": best.value, "params": dict(best.params)}
    return summary
