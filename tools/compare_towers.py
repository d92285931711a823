#!/usr/bin/env python3
"""Compare towers (single-task, shared-bottom, MMoE, PLE) per task over seeds, on the synthetic default and MovieLens.

Each (dataset, tower, seed) is one run of the main job (run_job) with only ``model.tower.kind`` and
``training.seed`` changed: the same data, embeddings, objective (ESMM + IPS-CVR + rating) and optimizer. The seed
moves the initialisation and the shuffle order; the data are fixed.

``single_task`` is the papers' baseline: one whole model per task (its own embedding tables, dense arch and tower),
trained on that task's loss alone, in that task's sample space (``SINGLE_TASK_OBJECTIVES``): CTR on all rows, CVR on
clicked rows (the "BASE" of ESMM, Ma et al., SIGIR 2018), CTCVR on all rows with the conversion label (0 on every
unclicked row in both datasets, so it is click-and-conversion), the rating on rated rows. ``separate_towers`` (extra
row) is the multi-task objective over the ``single_task`` tower kind: separate bottoms and heads, shared embeddings. Writes a JSON list of rows with keys
``dataset``, ``tower``, ``task``, ``metric``, ``mean``, ``std``, ``seeds`` (``std``: sample standard deviation over
the seeds) and prints the table. A benchmark, run by hand (the synthetic default takes about 2 min per run on 2
cores); not part of CI.

Example::

    .venv/bin/python tools/compare_towers.py --out runs/compare_towers.json
    .venv/bin/python tools/compare_towers.py --datasets movielens --seeds 0 1 --out /tmp/towers.json  # quicker
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

from common import ONE_PASS, ensure_movielens, quiet, run_or_reuse, save_rows, summary_row
from torchrec_mtl.config import load_config
from torchrec_mtl.results import headline

CONFIGS = {"synthetic": "configs/mmoe_synthetic.yaml", "movielens": "configs/mmoe_movielens.yaml"}
TOWERS = ["single_task", "separate_towers", "shared_bottom", "mmoe", "ple"]
# One objective per task for the single_task baseline (overrides of the dataset config's objective section).
SINGLE_TASK_OBJECTIVES = {
    "ctr": "{ctr: {label: click}}",
    # the click head is declared (it defines the clicked rows) but untrained: weight 0
    "cvr": "{ctr: {label: click, weight: 0}, cvr: {label: conversion, given: ctr}}",
    "ctcvr": "{ctcvr: {label: conversion}}",
    "rating": "{rating: {label: rating, kind: regression}}",
}


def summarise(runs: List[Dict]) -> List[Dict]:
    """One row per (dataset, tower, task): the headline metric's mean and spread over the seeds."""
    rows = []
    keys = sorted({(r["dataset"], r["tower"]) for r in runs}, key=lambda k: (k[0], TOWERS.index(k[1])))
    for dataset, tower in keys:
        group = [r for r in runs if r["dataset"] == dataset and r["tower"] == tower]
        for task, first in group[0]["tasks"].items():
            metric = headline(first)
            values = [r["tasks"][task][metric] for r in group]
            labels = {"dataset": dataset, "tower": tower, "task": task, "metric": metric}
            rows.append(summary_row(labels, values, [r["seed"] for r in group]))
    return rows


def format_table(rows: List[Dict]) -> str:
    columns = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    lines = [f"{'dataset':<10}{'tower':<14}" + "".join(f"{t + ' ' + m:>22}" for t, m in columns)]
    for dataset, tower in dict.fromkeys((r["dataset"], r["tower"]) for r in rows):
        cells = {r["task"]: r for r in rows if r["dataset"] == dataset and r["tower"] == tower}
        lines.append(
            f"{dataset:<10}{tower:<14}"
            + "".join(f"{cells[t]['mean']:>13.4f} ± {cells[t]['std']:.4f}" for t, _ in columns)
        )
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--towers", nargs="+", default=TOWERS, choices=TOWERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="JSON file for the summary rows")
    parser.add_argument("--runs", default="runs/compare_towers", help="folder for each run's results.json")
    args = parser.parse_args(argv)
    quiet()

    runs = []
    for dataset in args.datasets:
        for tower in args.towers:
            for seed in args.seeds:
                if tower == "single_task":
                    tasks = {}
                    for task, objective in SINGLE_TASK_OBJECTIVES.items():
                        overrides = [f"objective.tasks={objective}", "objective.products={}"]
                        results = _run(args.runs, dataset, tower, seed, "single_task", overrides, suffix=f"/{task}")
                        tasks[task] = results["tasks"][task]
                else:
                    kind = "single_task" if tower == "separate_towers" else tower
                    tasks = _run(args.runs, dataset, tower, seed, kind, [])["tasks"]
                runs.append({"dataset": dataset, "tower": tower, "seed": seed, "tasks": tasks})
    rows = summarise(runs)
    save_rows(rows, args.out, format_table(rows))
    return 0


def _run(runs_dir: str, dataset: str, tower: str, seed: int, kind: str, overrides: List[str], suffix: str = "") -> Dict:
    """One run of the main job (or its results from an earlier identical run)."""
    out_dir = f"{runs_dir}/{dataset}/{tower}{suffix}/seed{seed}"
    # without item text: the towers differ and nothing else (tools/compare_text.py measures the text)
    overrides = [
        *ONE_PASS,
        *overrides,
        "model.text=null",
        f"model.tower.kind={kind}",
        f"training.seed={seed}",
        f"out_dir={out_dir}",
    ]
    config = load_config(CONFIGS[dataset], [*overrides, "training.progress=false"])
    if dataset == "movielens":
        ensure_movielens(config.data.dir)
    return run_or_reuse(config, f"{dataset} {tower}{suffix} seed {seed}")


if __name__ == "__main__":
    sys.exit(main())
