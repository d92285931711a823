#!/usr/bin/env python3
"""The main job's training speed at two versions of this code, side by side: ``--before`` (a git revision) against
the working tree, the same config, data and overrides, the two taking turns run by run (before, after, after,
before, ...) so that the load of other processes falls on both alike.

Each run is ``python -m torchrec_mtl.cli train`` in a process of its own, with ``PYTHONPATH`` at that version's
checkout (the revision is checked out into a temporary git worktree, removed at the end), on this tree's config and
data, with shards and an ``out_dir`` of its own under ``--work``; its samples/s is the loop's own
(``results.json``'s ``training.samples_per_s``: rows trained over the loop's seconds). ``speedup`` = the median of after's samples/s over the median of before's; the test metrics of each
run are kept beside it, so that a faster version that learns less shows.

The default job is the README's main job as one pass on every training row (``bash tools/quickstart.sh
data.validation_fraction=0 training.early_stopping=null training.epochs=1``): the early-stopped job trains a
different number of steps at each version when its validation curve differs.

Example::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_versions.py --before 3a07978 --rounds 2 \\
        --out runs/bench_versions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from common import save_rows

ROOT = Path(__file__).resolve().parents[1]
ONE_PASS = ["data.validation_fraction=0", "training.early_stopping=null", "training.epochs=1"]


def train_once(checkout: Path, config: str, overrides: List[str], shards: Path, out_dir: Path) -> Dict:
    """One run of ``checkout``'s CLI on this tree's ``config`` (its data), preprocessing into ``shards`` (the
    version's own: each version's preprocessing reuses only shards it wrote); its samples/s and the test metrics
    (task -> metric -> value)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-m", "torchrec_mtl.cli", "train", "-q", "--config", str(ROOT / config),
               *overrides, "training.progress=false", f"data.shards={shards}", f"out_dir={out_dir}"]  # fmt: skip
    subprocess.run(command, env=env, cwd=checkout, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out_dir / "results.json").read_text())
    metrics = {task: {k: v for k, v in values.items() if k in ("auc", "rmse")}
               for task, values in results["tasks"].items()}  # fmt: skip
    return {"samples_per_s": results["training"]["samples_per_s"], "test": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--config", default="configs/mmoe_synthetic.yaml", help="the job (default: the main job)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each version (default 2)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_versions", help="the runs' out_dirs")
    parser.add_argument("--out", required=True, type=Path, help="JSON file for the figures")
    parser.add_argument("overrides", nargs="*", help=f"config overrides (default: {' '.join(ONE_PASS)})")
    args = parser.parse_args()
    overrides = args.overrides or ONE_PASS
    revision = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    runs: Dict[str, List[Dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench_versions_") as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), revision], cwd=ROOT, check=True)
        try:
            order = [name for r in range(args.rounds) for name in (("before", "after") if r % 2 == 0
                                                                   else ("after", "before"))]  # fmt: skip
            for i, name in enumerate(order):
                checkout = before if name == "before" else ROOT
                out_dir = args.work / f"{name}-{len(runs[name]) + 1}"
                print(f"run {i + 1}/{len(order)}: {name} ({revision if name == 'before' else 'working tree'})",
                      flush=True)  # fmt: skip
                shards = args.work / f"shards-{name}"
                runs[name].append(train_once(checkout, args.config, overrides, shards, out_dir))
                print(f"  {runs[name][-1]['samples_per_s']:,.0f} samples/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True)
    median = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    speedup = round(median["after"] / median["before"], 3)
    result = {"before": revision, "config": args.config, "overrides": overrides, "rounds": args.rounds,
              "samples_per_s": median, "speedup": speedup, "runs": runs}  # fmt: skip
    table = "\n".join(
        f"{name:6s} {median[name]:>9,.0f} samples/s   test "
        + ", ".join(f"{task} {m}" for task, m in rs[0]["test"].items())
        for name, rs in runs.items()
    )
    save_rows(result, args.out, f"{table}\nspeedup (after / before): {result['speedup']:.3f}")


if __name__ == "__main__":
    main()
