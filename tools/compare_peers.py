#!/usr/bin/env python3
"""Our default MMoE against the real peers' MMoE (DeepCTR-Torch, torch-rechub) on the same rows and split, over seeds.

For each dataset and seed:

- ``ours``: the dataset's shipped config (``configs/mmoe_<dataset>.yaml``) with its defaults, plus a seeded tenth
  of the training rows held out for validation (``data.validation_fraction=0.1``, unless the config names validation
  files or a fraction of its own), ``training.epochs=--max-epochs`` and ``training.early_stopping={metric: mean_auc,
  patience: --patience}`` (unless the config sets early stopping itself) and ``training.seed``; run through
  common.run_or_reuse into ``<runs>/<dataset>/ours/seed<S>``.
- the rows that run trains, validates and tests on, exported from our preprocessed shards (``split_rows``: the same
  split_validation draw as torchrec_mtl.run.prepare.prepare_job) to ``<runs>/<dataset>/rows/seed<S>.npz``: dense
  values, vocabulary-mapped IDs and the CTR and CVR labels (CVR present on clicked rows only);
- each peer (``deepctr_torch``, ``torch_rechub``) trains its MMoE on them with tools/peer_runner.py in the peers' own
  venv (``<runs>/venv``, made once from tools/peers-requirements.txt, never .venv): our embedding dimension, expert
  and tower sizes, batch size, epochs and patience; CTR on every row, CVR on clicked rows; best epoch by the same
  validation mean AUC (CTR, CVR, CTCVR); its test AUCs go to ``<runs>/<dataset>/<peer>/seed<S>.json``.

Test AUCs: CTR and CTCVR (pCTR x pCVR against click-and-convert) on every test row, CVR on clicked test rows, as our
results.json reports them. Ours also gets the item text where its config has it (MovieLens, affinity), and trains its
rating head; the peers see the IDs and dense values only: what each toolkit's MMoE does with the same rows.

Writes a JSON list of rows ``{"dataset", "model", "task", "metric", "mean", "std", "seeds", "values"}`` (``model``
``ours``, ``deepctr_torch`` or ``torch_rechub``; ``task`` ctr, cvr, ctcvr with metric ``auc``, and ``run`` with
``seconds``) and prints per dataset the table and our margin over the best peer against the spread. Finished runs are
reused (ours: the same learned config on the same data; a peer: the same rows and settings), so a stopped comparison
resumes. ``--time-limit`` bounds each contender on each dataset: a peer run is stopped when it would pass it, and no
further seed of a contender starts once its time is spent (what finished is reported). A benchmark run by hand;
not part of CI.

Example::

    nice -n 10 .venv/bin/python tools/compare_peers.py --out runs/compare_peers.json
    .venv/bin/python tools/compare_peers.py --datasets ali_ccp --seeds 0 --out /tmp/peers.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from common import data_identity, ensure_movielens, quiet, rows_by, run_or_reuse, save_rows, summary_row
from torchrec_mtl.config import ConfigError, JobConfig, load_config, synthetic_config, task_set
from torchrec_mtl.data import synthetic
from torchrec_mtl.data.prepare import prepare_shards
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.data.splits import split_validation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {name: f"configs/mmoe_{name}.yaml" for name in ("movielens", "ali_ccp", "aliexpress", "affinity", "synthetic")}
# tiny shared samples: a handful of test clicks and conversions, so every AUC there is noise
TINY = {"ali_ccp", "aliexpress"}
PEERS = ("deepctr_torch", "torch_rechub")
CONTENDERS = ("ours", *PEERS)
TASKS = ("ctr", "cvr", "ctcvr")
REQUIREMENTS = ROOT / "tools" / "peers-requirements.txt"
RUNNER = ROOT / "tools" / "peer_runner.py"
# what every run of ours shares: nothing shown or saved that the table does not need
QUIET_RUN = ["training.progress=false", "training.curve_every=0", "checkpoint.every_seconds=0",
             "checkpoint.at_end=false"]  # fmt: skip


def ours_config(dataset: str, seed: int, max_epochs: int, patience: int, runs: str) -> JobConfig:
    """The dataset's shipped config with validation rows, early stopping, ``seed`` and its own ``out_dir``."""
    shipped = load_config(ROOT / CONFIGS[dataset])
    keys = [*QUIET_RUN, f"training.seed={seed}", f"out_dir={Path(runs).resolve()}/{dataset}/ours/seed{seed}"]
    if shipped.data.validation_fraction <= 0 and not shipped.data.validation:
        keys.append("data.validation_fraction=0.1")
    if shipped.training.early_stopping is None:  # a config that stops early itself keeps its own setting
        keys += [f"training.epochs={max_epochs}",
                 f"training.early_stopping={{metric: mean_auc, patience: {patience}}}"]  # fmt: skip
    return load_config(ROOT / CONFIGS[dataset], keys)


def split_rows(config: JobConfig) -> Dict[str, EncodedLog]:
    """The train, validation and test rows ``config``'s run uses, from its preprocessed shards (preprocessing them
    when needed): the validation rows are the seeded ``data.validation_fraction`` of the training shards
    (split_validation with ``training.seed``, as prepare_job draws them), else the ``data.validation`` files.

    Example::

        >>> rows = split_rows(load_config("configs/mmoe_ali_ccp.yaml"))  # doctest: +SKIP
        >>> {split: len(log) for split, log in rows.items()}  # doctest: +SKIP
        {'train': 100, 'validation': 50, 'test': 50}
    """
    training = config.training
    if training.shuffle_labels or any(training.label_noise.values()):
        raise ConfigError("compare_peers: training.shuffle_labels and training.label_noise change the training "
                          "labels; the peers are compared on the logged ones")  # fmt: skip
    log = prepare_shards(config.data, progress=False)
    files = log.split("validation") if "validation" in log.splits else []
    train, validation = split_validation(log.split("train"), config.data.validation_fraction, training.seed)
    validation = validation or files
    if not validation:
        raise ConfigError(f"compare_peers: {config.data.dir}: no validation rows to stop early on")
    return {"train": EncodedLog.concat(train), "validation": EncodedLog.concat(validation),
            "test": EncodedLog.concat(log.split("test"))}  # fmt: skip


def task_labels(config: JobConfig) -> Tuple[str, str]:
    """The CTR and CVR label columns of ``config``'s tasks (CVR must be ``given: ctr``, the rows the peers use)."""
    tasks = {task.name: task for task in task_set(config.objective).tasks}
    if "ctr" not in tasks or "cvr" not in tasks or tasks["cvr"].given != "ctr":
        raise ConfigError("compare_peers: the config needs tasks ctr and cvr (given: ctr)")
    return tasks["ctr"].label, tasks["cvr"].label


def peer_arrays(config: JobConfig, rows: Dict[str, EncodedLog]) -> Dict[str, np.ndarray]:
    """The arrays tools/peer_runner.py reads: per split dense, sparse, ``ctr`` (the click label) and ``cvr`` (the
    conversion label where the row is clicked, NaN elsewhere: CVR's sample space)."""
    ctr_label, cvr_label = task_labels(config)
    arrays: Dict[str, np.ndarray] = {}
    for split, log in rows.items():
        click = np.asarray(log.labels[ctr_label], dtype=np.float32)
        conversion = np.asarray(log.labels[cvr_label], dtype=np.float32)
        arrays[f"{split}_dense"] = np.asarray(log.dense, dtype=np.float32)
        arrays[f"{split}_sparse"] = np.asarray(log.sparse, dtype=np.int64)
        arrays[f"{split}_ctr"] = click
        arrays[f"{split}_cvr"] = np.where(click == 1, conversion, np.nan).astype(np.float32)
    return arrays


def export_rows(config: JobConfig, folder: Path, max_epochs: int, patience: int) -> Tuple[Path, Path]:
    """Write (or keep, when the data and settings are the same) ``folder/seed<S>.npz`` and its ``.json`` for
    tools/peer_runner.py; the .json holds the rows' hash and the settings, which a peer's result repeats."""
    seed = config.training.seed
    npz, meta_path = folder / f"seed{seed}.npz", folder / f"seed{seed}.json"
    identity = {"data": data_identity(config), "validation_fraction": config.data.validation_fraction,
                "validation": list(config.data.validation), "seed": seed, "labels": list(task_labels(config))}  # fmt: skip
    if npz.exists() and meta_path.exists() and json.loads(meta_path.read_text()).get("identity") == identity:
        return npz, meta_path
    log = prepare_shards(config.data, progress=False)
    arrays = peer_arrays(config, split_rows(config))
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    model, tower = config.model, config.model.tower
    if tower.kind != "mmoe":
        raise ConfigError(f"compare_peers: model.tower.kind {tower.kind!r}; the peers run MMoE")
    meta = {
        "identity": identity, "hash": digest.hexdigest()[:16], "categorical": log.categorical_features,
        "table_sizes": [log.table_sizes[f] for f in log.categorical_features], "dense": log.dense_features,
        "rows": {split: int(arrays[f"{split}_ctr"].shape[0]) for split in ("train", "validation", "test")},
        "embedding_dim": model.embedding_dim, "num_experts": tower.num_experts,
        "expert_layer_sizes": list(tower.expert_layer_sizes), "tower_layer_sizes": list(tower.tower_layer_sizes),
        "batch_size": config.training.batch_size, "eval_batch_size": config.training.eval_batch_size,
        "max_epochs": max_epochs, "patience": patience,
        "requirements": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"seed{seed}.partial.npz", **arrays)
    (folder / f"seed{seed}.partial.npz").replace(npz)
    meta_path.write_text(json.dumps(meta, indent=2))  # last: a half-written export is never taken as done
    return npz, meta_path


def ensure_generated(config: JobConfig) -> None:
    """Generate ``config``'s synthetic log into ``data.dir`` unless it holds that log already (the check our run
    makes, torchrec_mtl.run.prepare), so that the peers can run before or without ours."""
    generate = config.data.generate
    if generate is None:
        return
    meta_path = Path(config.data.dir) / "meta.json"
    existing = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if (existing.get("config"), existing.get("generator_version")) != (asdict(generate), synthetic.GENERATOR_VERSION):
        print(f"generating the synthetic log ({generate.num_rows:,} rows) into {config.data.dir} ...", flush=True)
        synthetic.generate(synthetic_config(config.data), config.data.dir)


def ensure_peer_venv(venv: Path, torch_index: Optional[str] = None) -> Path:
    """The python of ``venv``, made with python3.11 -m venv and tools/peers-requirements.txt installed into it
    unless it already holds exactly those (its ``requirements.txt`` copy says so)."""
    python = venv / "bin" / "python"
    marker = venv / "requirements.txt"
    if python.exists() and marker.exists() and marker.read_text() == REQUIREMENTS.read_text():
        return python
    creator = shutil.which("python3.11") or sys.executable
    print(f"making the peers' venv {venv} ({creator} -m venv; pip install -r {REQUIREMENTS.name}) ...", flush=True)
    subprocess.run([creator, "-m", "venv", str(venv)], check=True)
    command = [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]
    if torch_index:
        command += ["--extra-index-url", torch_index]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: pip could not install {REQUIREMENTS} into {venv}; for the CPU torch wheel pass "
                         "--torch-index https://download.pytorch.org/whl/cpu (or put the wheel in pip's find-links)")
    marker.write_text(REQUIREMENTS.read_text())
    return python


def run_peer(python: Path, peer: str, npz: Path, meta_path: Path, out: Path, seed: int,
             limit_s: float) -> Optional[Dict[str, Any]]:  # fmt: skip
    """The peer's result for these rows: reused from ``out`` when made with the same rows and settings, else run
    now (stopped after ``limit_s`` seconds: then None)."""
    meta = json.loads(meta_path.read_text())
    if out.exists():
        result = json.loads(out.read_text())
        if result.get("settings") == meta:
            return result
    if limit_s <= 0:
        return None
    print(f"== {peer} seed {seed} ({meta['rows']['train']:,} training rows)", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core: the machine is shared
    command = [str(python), str(RUNNER), "--model", peer, "--rows", str(npz), "--meta", str(meta_path),
               "--seed", str(seed), "--out", str(out)]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")  # the peers' own progress bars and loss lines go here, not between our lines
    try:
        with log.open("w") as sink:
            subprocess.run(command, check=True, env=env, timeout=limit_s, stdout=sink, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        print(f"   {peer} seed {seed}: stopped at the time limit ({limit_s:.0f} s); its log: {log}", flush=True)
        return None
    except subprocess.CalledProcessError as error:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{tail}\nerror: {peer} failed on {npz} (exit {error.returncode}); its log: {log}") from None
    result = json.loads(out.read_text())
    print(f"   {peer} seed {seed}: test AUC " + ", ".join(f"{t} {v:.4f}" for t, v in result["test"].items())
          + f"; best epoch {result['best_epoch'] + 1} of {result['epochs']}, {result['seconds']:.0f} s", flush=True)
    return result


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (dataset, model, task): the test AUC's mean and spread over the seeds; and seconds per run."""
    rows = []
    for (dataset, model), group in rows_by(runs, "dataset", "model").items():
        seeds = [run["seed"] for run in group]
        for task in TASKS:
            values = [run["test"][task] for run in group]
            rows.append(summary_row({"dataset": dataset, "model": model, "task": task, "metric": "auc"}, values, seeds))
        seconds = [run["seconds"] for run in group]
        rows.append(summary_row({"dataset": dataset, "model": model, "task": "run", "metric": "seconds"}, seconds,
                                seeds))  # fmt: skip
    return rows


def margins(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (dataset, task): the best peer by mean, our margin over it, and the larger of the two spreads;
    ``above`` is True when the margin exceeds that spread."""
    cell = {(r["dataset"], r["model"], r["task"]): r for r in rows}
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for task in TASKS:
            ours = cell.get((dataset, "ours", task))
            peers = [cell[(dataset, p, task)] for p in PEERS if (dataset, p, task) in cell]
            peers = [p for p in peers if not np.isnan(p["mean"])]
            if ours is None or not peers:
                continue
            best = max(peers, key=lambda r: r["mean"])
            margin, spread = ours["mean"] - best["mean"], max(ours["std"], best["std"])
            out.append({"dataset": dataset, "task": task, "best_peer": best["model"], "margin": round(margin, 6),
                        "spread": spread, "above": margin > spread, "our_seeds": len(ours["seeds"])})  # fmt: skip
    return out


def format_tables(rows: List[Dict[str, Any]]) -> str:
    """Markdown, one table per dataset: each contender's test AUCs (mean ± std over seeds) and seconds per run, then
    our margin over the best peer per task against the larger spread."""
    cell = {(r["dataset"], r["model"], r["task"]): r for r in rows}
    fmt = lambda r: f"{r['mean']:.4f} ± {r['std']:.4f}" if r else "n/a"  # noqa: E731
    by_margin = {(m["dataset"], m["task"]): m for m in margins(rows)}
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        note = " (tiny sample: every AUC is unreliable)" if dataset in TINY else ""
        out += [f"### {dataset}{note}", "", "| model | seeds | CTR AUC | CVR AUC | CTCVR AUC | seconds per run |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for model in CONTENDERS:
            run = cell.get((dataset, model, "run"))
            if run is None:
                continue
            values = [fmt(cell.get((dataset, model, task))) for task in TASKS]
            seeds = ",".join(map(str, run["seeds"]))
            out.append(f"| {model} | {seeds} | " + " | ".join(values) + f" | {run['mean']:.0f} |")
        lines = []
        for task in TASKS:
            m = by_margin.get((dataset, task))
            if m is not None:
                verdict = "above" if m["above"] else "NOT above"
                alone = ", ours from one seed: its own spread unknown" if m["our_seeds"] < 2 else ""
                lines.append(f"{task.upper()} {m['margin']:+.4f} vs {m['best_peer']} ({verdict} the spread "
                             f"{m['spread']:.4f}{alone})")  # fmt: skip
        out += ["", "ours - best peer: " + "; ".join(lines) if lines else "ours - best peer: n/a", ""]
    return "\n".join(out)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["movielens", "ali_ccp", "aliexpress", "affinity"],
                        choices=list(CONFIGS))  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=5, help="epochs at most (early stopping picks the best)")
    parser.add_argument("--patience", type=int, default=2, help="epochs without a better validation mean AUC")
    parser.add_argument("--time-limit", type=float, default=3600.0,
                        help="seconds per contender and dataset, all seeds together (0: report only the runs "
                             "that have finished)")  # fmt: skip
    parser.add_argument("--runs", default="runs/peers", help="folder for the venv, the rows and every run")
    parser.add_argument("--venv", default=None, help="the peers' venv (default: <runs>/venv)")
    parser.add_argument("--torch-index", default=None, help="an extra pip index for the CPU torch wheel")
    parser.add_argument("--out", required=True, help="JSON file for the summary rows")
    args = parser.parse_args(argv)
    quiet()
    runs_dir = Path(args.runs)
    venv = Path(args.venv) if args.venv else runs_dir / "venv"
    python = ensure_peer_venv(venv, args.torch_index) if set(args.models) & set(PEERS) else None
    runs: List[Dict[str, Any]] = []
    # seed by seed within a dataset: every contender's first seed comes early, and a time limit cuts later seeds
    plan = [(dataset, model, seed) for dataset in args.datasets for seed in args.seeds for model in args.models]
    spent: Dict[Tuple[str, str], float] = {}
    for dataset, model, seed in tqdm(plan, desc="runs", unit="run", file=sys.stdout):
        left = args.time_limit - spent.get((dataset, model), 0.0)
        config = ours_config(dataset, seed, args.max_epochs, args.patience, args.runs)
        if dataset == "movielens":
            ensure_movielens(config.data.dir)
        start = time.time()
        if model == "ours":
            cached = (Path(config.out_dir) / "results.json").exists()
            if left <= 0 and not cached:
                print(f"   ours {dataset} seed {seed}: skipped, its time limit is spent", flush=True)
                continue
            results = run_or_reuse(config, f"ours {dataset} seed {seed}")
            test = {task: results["tasks"][task]["auc"] for task in TASKS}
            record = {"test": test, "seconds": results["training"]["total_seconds"],
                      "best_epoch": results["training"].get("selected", {}).get("epoch")}  # fmt: skip
        else:
            ensure_generated(config)
            npz, meta = export_rows(config, runs_dir / dataset / "rows", args.max_epochs, args.patience)
            result = run_peer(python, model, npz, meta, runs_dir / dataset / model / f"seed{seed}.json", seed, left)
            if result is None:
                continue
            record = {"test": result["test"], "seconds": result["seconds"], "best_epoch": result["best_epoch"]}
        spent[(dataset, model)] = spent.get((dataset, model), 0.0) + time.time() - start
        runs.append({"dataset": dataset, "model": model, "seed": seed, **record})
    rows = summarise(runs)
    save_rows(rows, args.out, format_tables(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
