#!/usr/bin/env python3
"""Compare a model that reads the behaviour histories with one that does not, per task over seeds, on the datasets
with histories: the synthetic 'history' profile (``configs/din_history.yaml``), MovieLens (``din_movielens.yaml``)
and MIND (``din_mind.yaml``), each with its shipped config as it is (validation tenth, early stopping).

The models, each the dataset's config with only these changes (and ``training.seed``):

- ``history``: the config as it is: the model its ``model.sequence`` names (DIN over the history lists, the
  candidate as the query; the lists pooled when the config sets no sequence).
- ``pooled``: the config without ``model.sequence``: the history lists mean-pooled like any list column, no
  attention (cheap: the same shards as ``history``).
- ``no_history``: the config without ``model.sequence`` and with the history columns (the sequence features, else
  every list column of the schema) moved to the schema's ``ignore``: a schema written beside the runs
  (``<runs>/<dataset>/no_history.schema.yaml``, the file layout unchanged) and shards of its own (the config's
  ``data.shards`` + ``_no_history``).


Writes a JSON list of rows ``{"dataset", "model", "task", "metric", "mean", "std", "seeds", "values"}`` (every
task's headline test metric, and CTR's GAUC) and prints the table. A benchmark, run by hand (runs already made are
reused, tools/common.py); not part of CI. MovieLens and MIND are converted from ../shared/data when their logs are
missing or were written before the histories.

Example::

    .venv/bin/python tools/compare_history.py --out runs/compare_history.json
    .venv/bin/python tools/compare_history.py --datasets movielens --models pooled no_history --seeds 0 \\
        --out /tmp/h.json  # quicker; runs where model.sequence is not known yet
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml

from common import ensure_converted, quiet, rows_by, run_or_reuse, save_rows, summary_row
from torchrec_mtl.config import load_config
from torchrec_mtl.config.load import _read_yaml
from torchrec_mtl.config.sections import ConfigError
from torchrec_mtl.results import headline
from torchrec_mtl.schema import DatasetSchema
from torchrec_mtl.yaml_files import read_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "history": "configs/din_history.yaml",
    "movielens": "configs/din_movielens.yaml",
    "mind": "configs/din_mind.yaml",
}
MODELS = ["history", "no_history", "pooled"]
EXTRA_METRICS = {"ctr": ["gauc"]}  # beside each task's headline


def history_columns(raw: Dict[str, Any], schema: DatasetSchema) -> List[str]:
    """The columns the history model reads beyond the other: the sequence features, else every list column."""
    sequence = (raw.get("model") or {}).get("sequence") or {}
    features = list(sequence.get("features") or []) if sequence.get("kind", "din") != "none" else []
    return features or schema.list_columns


def schema_without(schema_path: str, columns: List[str]) -> Dict[str, Any]:
    """The schema (as its YAML reads) with ``columns`` moved from ``categorical`` and ``lists`` to ``ignore``; a
    headerless file's layout is kept by naming its columns."""
    raw = read_yaml(schema_path, "schema")
    schema = DatasetSchema.from_dict(raw, source=schema_path)
    missing = [c for c in columns if c not in schema.categorical]
    if missing:
        raise ValueError(f"{schema_path}: {missing} are no categorical columns; nothing to move to ignore")
    derived = copy.deepcopy(raw)
    if not schema.header and "columns" not in derived:
        derived["columns"] = schema.columns
    derived["name"] = f"{schema.name}_no_history"
    derived["categorical"] = [c for c in schema.categorical if c not in columns]
    derived["ignore"] = [*(raw.get("ignore") or []), *columns]
    derived["lists"] = {name: spec for name, spec in (raw.get("lists") or {}).items() if name not in columns}
    if not derived["lists"]:
        del derived["lists"]
    return derived


def build_variant(raw: Dict[str, Any], model: str, folder: Path) -> Dict[str, Any]:  # noqa: C901
    """``model``'s config (a raw dict) from the dataset's ``raw`` config (its paths resolved); ``folder`` takes the
    no_history schema."""
    raw = copy.deepcopy(raw)
    model_section = raw.setdefault("model", {})
    if model == "history":
        return raw
    columns = history_columns(raw, DatasetSchema.from_yaml(raw["data"]["schema"]))
    model_section.pop("sequence", None)
    if model == "pooled":
        return raw
    data = raw["data"]
    folder.mkdir(parents=True, exist_ok=True)
    schema_file = folder / "no_history.schema.yaml"
    text = yaml.safe_dump(schema_without(data["schema"], columns), sort_keys=False)
    if not schema_file.exists() or schema_file.read_text() != text:  # unchanged: the runs made with it are reused
        schema_file.write_text(text)
    data["schema"] = str(schema_file.resolve())  # and shards of its own: see main
    return raw


def summarise(runs: List[Dict]) -> List[Dict]:
    """One row per (dataset, model, task, metric): the headline metrics (and CTR's GAUC) over the seeds."""
    rows = []
    for (dataset, model), group in rows_by(runs, "dataset", "model").items():
        seeds = [r["seed"] for r in group]
        for task, first in group[0]["results"]["tasks"].items():
            for metric in [headline(first), *(m for m in EXTRA_METRICS.get(task, []) if m in first)]:
                values = [r["results"]["tasks"][task][metric] for r in group]
                labels = {"dataset": dataset, "model": model, "task": task, "metric": metric}
                rows.append(summary_row(labels, values, seeds))
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = []
    for (dataset,), group in rows_by(rows, "dataset").items():
        columns = list(dict.fromkeys((r["task"], r["metric"]) for r in group))
        lines.append(f"{dataset:<11}{'':<12}" + "".join(f"{t + ' ' + m:>20}" for t, m in columns))
        for (model,), cells in rows_by(group, "model").items():
            by_task = {(r["task"], r["metric"]): r for r in cells}
            lines.append(
                f"{'':<11}{model:<12}"
                + "".join(
                    f"{by_task[c]['mean']:>11.4f} ± {by_task[c]['std']:<6.4f}" if c in by_task else f"{'-':>20}"
                    for c in columns
                )
            )
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--models", nargs="+", default=["history", "no_history"], choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="JSON file for the summary rows")
    parser.add_argument("--runs", default="runs/compare_history", help="folder for each run's results.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run (e.g. training.epochs=1 model.text=null)")  # fmt: skip
    args = parser.parse_args(argv)
    quiet()

    runs = []
    for dataset in args.datasets:
        raw = _read_yaml(REPO / CONFIGS[dataset])
        for model in args.models:
            try:
                config_raw = build_variant(raw, model, Path(args.runs) / dataset)
            except ConfigError as error:
                print(f"compare_history: {dataset}: {error}", file=sys.stderr)
                return 2
            for seed in args.seeds:
                out_dir = f"{args.runs}/{dataset}/{model}/seed{seed}"
                overrides = [*args.set, f"training.seed={seed}", f"out_dir={out_dir}", "training.progress=false"]
                config = load_config(raw=config_raw, overrides=overrides)
                if model == "no_history":  # the other schema's shards beside the config's, never over them
                    shards = config.data.shards or os.path.join(config.data.dir, "shards")
                    config = load_config(raw=config_raw, overrides=[*overrides, f"data.shards={shards}_no_history"])
                ensure_converted(dataset, config.data.dir)
                results = run_or_reuse(config, f"{dataset} {model} seed {seed}")
                runs.append({"dataset": dataset, "model": model, "seed": seed, "results": results})
    rows = summarise(runs)
    save_rows(rows, args.out, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
