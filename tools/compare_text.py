#!/usr/bin/env python3
"""Item text against IDs alone, on cold and warm items, over seeds: the synthetic default and MovieLens.

Each (dataset, model, seed) is one run of the main job (run_job): ``text`` adds the item-text table
(frozen MiniLM vectors of each item's description, projected beside the ID embeddings; ``model.text``), ``id_only`` is
the same config without it. Everything else (data, tower, objective, item-ID dropout, optimizer) is the dataset
config's. The job evaluates every test row and, apart, the rows whose item never appears in training (``cold``) and
the rest (``warm``).

Writes a JSON list of rows with keys ``dataset``, ``model``, ``segment`` (``cold``, ``warm`` or ``all``), ``task``,
``metric``, ``mean``, ``std`` (sample standard deviation over seeds), ``seeds`` and ``values``, with the headline
metric of each task (AUC, RMSE) and GAUC for binary tasks; prints the table and the text-minus-ID difference on cold
CTR AUC. A benchmark run by hand (the synthetic default takes 2-4 min per run on 2 cores); not part of CI.

Example::

    .venv/bin/python tools/compare_text.py --out runs/compare_text.json
    .venv/bin/python tools/compare_text.py --datasets movielens --seeds 0 --out /tmp/text.json  # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

from common import ONE_PASS, ensure_movielens, quiet, rows_by, run_or_reuse, summary_row
from torchrec_mtl.config import load_config
from torchrec_mtl.results import headline

CONFIGS = {"synthetic": "configs/mmoe_synthetic.yaml", "movielens": "configs/mmoe_movielens.yaml"}
MODELS = {"text": ["model.text={}"], "id_only": ["model.text=null"]}
SEGMENTS = ("cold", "warm", "all")


def _metrics(results: Dict, segment: str) -> Dict[str, Dict[str, float]]:
    return results["tasks"] if segment == "all" else results["segments"][segment]["tasks"]


def summarise(runs: List[Dict]) -> List[Dict]:
    """One row per (dataset, model, segment, task, metric): mean and spread over the seeds."""
    rows = []
    for (dataset, model), group in rows_by(runs, "dataset", "model").items():
        for segment in SEGMENTS:
            for task, first in _metrics(group[0]["results"], segment).items():
                for metric in [headline(first), *(["gauc"] if "gauc" in first else [])]:
                    values = [_metrics(r["results"], segment)[task][metric] for r in group]
                    labels = {"dataset": dataset, "model": model, "segment": segment, "task": task, "metric": metric}
                    rows.append(summary_row(labels, values, [r["seed"] for r in group]))
    return rows


def format_table(rows: List[Dict]) -> str:
    headline_rows = [r for r in rows if r["metric"] != "gauc"]
    columns = list(dict.fromkeys((r["task"], r["metric"]) for r in headline_rows))
    lines = [f"{'dataset':<10}{'model':<9}{'segment':<8}" + "".join(f"{t + ' ' + m:>20}" for t, m in columns)]
    for (dataset, model, segment), group in rows_by(headline_rows, "dataset", "model", "segment").items():
        cells = {r["task"]: r for r in group}
        lines.append(
            f"{dataset:<10}{model:<9}{segment:<8}"
            + "".join(f"{cells[t]['mean']:>11.4f} ± {cells[t]['std']:.4f}" for t, _ in columns)
        )
    return "\n".join(lines)


def cold_ctr_gain(rows: List[Dict]) -> Dict[str, float]:
    """Per dataset: text minus id_only on cold-item CTR AUC (means over seeds)."""
    cell = {
        (r["dataset"], r["model"]): r["mean"]
        for r in rows
        if (r["segment"], r["task"], r["metric"]) == ("cold", "ctr", "auc")
    }
    return {
        d: round(cell[(d, "text")] - cell[(d, "id_only")], 4) for d, m in cell if m == "text" and (d, "id_only") in cell
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="JSON file for the summary rows")
    parser.add_argument("--runs", default="runs/compare_text", help="folder for each run's results.json")
    args = parser.parse_args(argv)
    quiet()

    runs = []
    for dataset in args.datasets:
        for model in args.models:
            for seed in args.seeds:
                out_dir = f"{args.runs}/{dataset}/{model}/seed{seed}"
                overrides = [*ONE_PASS, *MODELS[model], f"training.seed={seed}", f"out_dir={out_dir}",
                             "training.progress=false"]  # fmt: skip
                config = load_config(CONFIGS[dataset], overrides)
                if dataset == "movielens":
                    ensure_movielens(config.data.dir)
                results = run_or_reuse(config, f"{dataset} {model} seed {seed}")
                runs.append({"dataset": dataset, "model": model, "seed": seed, "results": results})
    rows = summarise(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    for dataset, gain in cold_ctr_gain(rows).items():
        print(f"{dataset}: text - id_only on cold-item CTR AUC = {gain:+.4f}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
