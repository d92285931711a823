#!/usr/bin/env python3
"""Compare towers (single-task, shared-bottom, MMoE, PLE) per task over seeds, on the synthetic default and MovieLens.

Each (dataset, tower, seed) is one run of the main job (torchrec_mtl.job.run_job) with only ``model.tower.kind`` and
``training.seed`` changed: the same data, embeddings, objective (ESMM + IPS-CVR + rating) and optimizer. The seed
moves the initialisation and the shuffle order; the data are fixed. Writes a JSON list of rows with keys
``dataset``, ``tower``, ``task``, ``metric``, ``mean``, ``std``, ``seeds`` (``std``: sample standard deviation over
the seeds) and prints the table. A benchmark, run by hand (the synthetic default takes about 2 min per run on 2
cores); not part of CI.

Example::

    .venv/bin/python tools/compare_towers.py --out runs/compare_towers.json
    .venv/bin/python tools/compare_towers.py --datasets movielens --seeds 0 1 --out /tmp/towers.json  # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import warnings
from pathlib import Path
from typing import Dict, List

from torchrec_mtl.config import load_config
from torchrec_mtl.job import headline, run_job

CONFIGS = {"synthetic": "configs/mmoe_synthetic.yaml", "movielens": "configs/mmoe_movielens.yaml"}
TOWERS = ["single_task", "shared_bottom", "mmoe", "ple"]


def _ensure_movielens(data_dir: str) -> None:
    if not (Path(data_dir) / "train.tsv").exists():
        from torchrec_mtl.data.movielens import convert_movielens

        convert_movielens("../shared/data/movielens-latest-small", data_dir)


def summarise(runs: List[Dict]) -> List[Dict]:
    """One row per (dataset, tower, task): the headline metric's mean and spread over the seeds."""
    rows = []
    keys = sorted({(r["dataset"], r["tower"]) for r in runs}, key=lambda k: (k[0], TOWERS.index(k[1])))
    for dataset, tower in keys:
        group = [r for r in runs if r["dataset"] == dataset and r["tower"] == tower]
        for task, first in group[0]["tasks"].items():
            metric = headline(first)
            values = [r["tasks"][task][metric] for r in group]
            rows.append(
                {
                    "dataset": dataset,
                    "tower": tower,
                    "task": task,
                    "metric": metric,
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": [r["seed"] for r in group],
                    "values": values,
                }
            )
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
    for name in ("torchrec", "root", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    runs = []
    for dataset in args.datasets:
        for tower in args.towers:
            for seed in args.seeds:
                out_dir = f"{args.runs}/{dataset}/{tower}/seed{seed}"
                cached = Path(out_dir) / "results.json"
                overrides = [f"model.tower.kind={tower}", f"training.seed={seed}", f"out_dir={out_dir}"]
                config = load_config(CONFIGS[dataset], [*overrides, "training.progress=false"])
                if dataset == "movielens":
                    _ensure_movielens(config.data.dir)
                if cached.exists() and json.loads(cached.read_text())["config"]["model"] == _model_dict(config):
                    results = json.loads(cached.read_text())
                else:
                    print(f"== {dataset} {tower} seed {seed}", flush=True)
                    results = run_job(config)
                runs.append({"dataset": dataset, "tower": tower, "seed": seed, "tasks": results["tasks"]})
    rows = summarise(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    print(f"-> {args.out}")
    return 0


def _model_dict(config) -> Dict:
    from torchrec_mtl.config import config_to_dict

    return config_to_dict(config)["model"]


if __name__ == "__main__":
    sys.exit(main())
