#!/usr/bin/env python3
"""Compare the interaction layers (``model.interaction.kind``: dot, dcn, concat) per task over seeds, on every
shipped dataset with two or more tasks, each with its shipped config as it is (validation tenth, early stopping).

Each (dataset, kind, seed) is one run of the dataset's config with only ``model.interaction.kind`` and
``training.seed`` changed: the same data, tower, objective, optimizer and model selection. The seed moves the
initialisation and the shuffle order (and the validation rows drawn from the training rows); the data are fixed.
Besides each task's headline test metric, every run's training samples/s and selected step are kept, so the default
can be chosen on quality and speed together.

Writes a JSON list of rows ``{"dataset", "interaction", "task", "metric", "mean", "std", "seeds", "values"}`` (task
``speed``, metric ``samples_per_s``, for the throughput; task ``selection``, metric ``step``, for the selected step)
and prints the table. A benchmark, run by hand (runs already made are reused, tools/common.py); not part of CI.

Example::

    .venv/bin/python tools/compare_interactions.py --out runs/compare_interactions.json
    .venv/bin/python tools/compare_interactions.py --datasets movielens --seeds 0 --out /tmp/i.json  # quicker
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

from common import ensure_movielens, quiet, rows_by, run_or_reuse, save_rows, summary_row
from torchrec_mtl.config import load_config
from torchrec_mtl.results import headline

# the shipped job configs whose data have two or more tasks (MIND and the Criteo sample have a click only)
CONFIGS = {
    "synthetic": "configs/mmoe_synthetic.yaml",
    "affinity": "configs/mmoe_affinity.yaml",
    "movielens": "configs/mmoe_movielens.yaml",
    "ali_ccp": "configs/mmoe_ali_ccp.yaml",
    "aliexpress": "configs/mmoe_aliexpress.yaml",
}
KINDS = ["dot", "dcn", "concat"]


def summarise(runs: List[Dict]) -> List[Dict]:
    """One row per (dataset, kind, task): the headline metric's mean and spread over the seeds; then the speed and
    the selected step."""
    rows = []
    for (dataset, kind), group in rows_by(runs, "dataset", "interaction").items():
        labels = {"dataset": dataset, "interaction": kind}
        seeds = [r["seed"] for r in group]
        for task, first in group[0]["results"]["tasks"].items():
            metric = headline(first)
            values = [r["results"]["tasks"][task][metric] for r in group]
            rows.append(summary_row({**labels, "task": task, "metric": metric}, values, seeds))
        training = [r["results"]["training"] for r in group]
        speed = [t["samples_per_s"] for t in training]
        rows.append(summary_row({**labels, "task": "speed", "metric": "samples_per_s"}, speed, seeds))
        steps = [t.get("selected", {}).get("step", t["steps"]) for t in training]
        rows.append(summary_row({**labels, "task": "selection", "metric": "step"}, steps, seeds))
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = []
    for (dataset,), group in rows_by(rows, "dataset").items():
        columns = list(dict.fromkeys((r["task"], r["metric"]) for r in group))
        lines.append(f"{dataset:<12}{'':<8}" + "".join(f"{t + ' ' + m:>24}" for t, m in columns))
        for (kind,), cells in rows_by(group, "interaction").items():
            by_task = {(r["task"], r["metric"]): r for r in cells}
            lines.append(
                f"{'':<12}{kind:<8}"
                + "".join(f"{by_task[c]['mean']:>15.4f} ± {by_task[c]['std']:<6.4f}" for c in columns)
            )
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="JSON file for the summary rows")
    parser.add_argument("--runs", default="runs/compare_interactions", help="folder for each run's results.json")
    args = parser.parse_args(argv)
    quiet()

    runs = []
    for dataset in args.datasets:
        for kind in args.kinds:
            for seed in args.seeds:
                out_dir = f"{args.runs}/{dataset}/{kind}/seed{seed}"
                overrides = [f"model.interaction.kind={kind}", f"training.seed={seed}", f"out_dir={out_dir}"]
                config = load_config(CONFIGS[dataset], [*overrides, "training.progress=false"])
                if dataset == "movielens":
                    ensure_movielens(config.data.dir)
                results = run_or_reuse(config, f"{dataset} {kind} seed {seed}")
                runs.append({"dataset": dataset, "interaction": kind, "seed": seed, "results": results})
    rows = summarise(runs)
    save_rows(rows, args.out, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
