#!/usr/bin/env python3
"""What pruning at export (torchrec_mtl.pruning) costs in test metrics and saves in artifact size, beside int8.

For each dataset and seed the main job is trained once (run_job; only ``training.seed`` changes), then exported in
each setting of ``SETTINGS`` through ``torchrec_mtl.inference.export`` (the ``torchrec-mtl export`` path) and the
test split is scored with the exported ``model.pt`` itself: loaded with ``torch.jit.load``, fed the test shards'
encoded table rows (plus the item-text row, as predict encodes them). Each task's headline metric (AUC; RMSE for
the rating) is computed on all test rows, on ``cold`` rows (their item never appears in training) and on ``warm``
rows, against the labels the run evaluated (``predictions.npz``), as results.json's segments are defined
(torchrec_mtl.run.evaluate). Sizes: ``model.pt`` in bytes as written, gzip-compressed (what zeroed weights buy),
and its tensors by part. Writes a JSON list of rows with keys ``dataset``, ``setting``, ``task``, ``segment``,
``metric``, ``mean``, ``std`` (sample standard deviation over seeds), ``seeds``, ``values``, ``size_bytes``,
``size_gzip_bytes``, ``id_table_bytes`` (the ID tables as stored), ``remap_bytes`` (the kept rows' numbers),
``text_table_bytes`` (the item-text table), ``other_tensor_bytes`` (dense layers and the rest), ``id_rows_kept``
(the share of ID-table rows kept), and prints the table. A benchmark, run by hand (on 2 shared cores: about 5 min
per synthetic run, 3 per MovieLens run, 20 s per export and scoring).

Example::

    .venv/bin/python tools/compare_pruning.py --out runs/compare_pruning.json
    .venv/bin/python tools/compare_pruning.py --datasets movielens --seeds 0 --out /tmp/pruning.json  # quicker
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from common import ONE_PASS, ensure_movielens, mean_and_spread, quiet, run_or_reuse, summary_row
from torchrec_mtl.config import load_config
from torchrec_mtl.data.prepare import shards_dir
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.data.splits import cold_item_rows
from torchrec_mtl.inference import TrainedModel, export, load_trained
from torchrec_mtl.pruning import Pruning
from torchrec_mtl.results import headline
from torchrec_mtl.train.metrics import TaskMetrics

CONFIGS = {"synthetic": "configs/mmoe_synthetic.yaml", "movielens": "configs/mmoe_movielens.yaml"}
# setting -> (int8 tables, what is pruned); fp32 is the unpruned export every other setting is read against
SETTINGS: Dict[str, Tuple[bool, Pruning]] = {
    "fp32": (False, Pruning()),
    "rows50_count": (False, Pruning(rows=0.5, by="count")),
    "rows90_count": (False, Pruning(rows=0.9, by="count")),
    "rows50_norm": (False, Pruning(rows=0.5, by="norm")),
    "rows90_norm": (False, Pruning(rows=0.9, by="norm")),
    "rows90_count_per_table": (False, Pruning(rows=0.9, by="count", scope="table")),
    "dense50": (False, Pruning(dense=0.5)),
    "int8": (True, Pruning()),
    "int8_rows90_count": (True, Pruning(rows=0.9, by="count")),
}
SEGMENTS = ("all", "cold", "warm")
SIZES = ("size_gzip_bytes", "id_table_bytes", "remap_bytes", "text_table_bytes", "other_tensor_bytes")
BATCH = 8192


def test_inputs(trained: TrainedModel) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test split as model.pt takes it: dense features, encoded table rows (with the item-text row appended
    when the model has item text, as torchrec_mtl.data.splits.with_item_text_rows does in training), and the mask
    of cold rows (the item never appears in the training split)."""
    config = trained.config
    log = ShardedLog.open(shards_dir(config.data))
    test = EncodedLog.concat(log.split("test"))
    sparse = np.asarray(test.sparse, dtype=np.int64)
    if trained.inputs["item_text"] is not None:
        from torchrec_mtl.schema import DatasetSchema
        from torchrec_mtl.text.table import ItemTextTable

        data, text = Path(config.data.dir), config.model.text
        table = ItemTextTable.load(data / text.items, data / text.cache,
                                   DatasetSchema.from_yaml(config.data.schema).categorical_format)  # fmt: skip
        sparse = np.concatenate([sparse, table.rows(test.keys[log.metadata["item_text_key"]])[:, None]], axis=1)
    cold = cold_item_rows(log.split("train"), log.split("test"), log.metadata["item_id"])
    return np.asarray(test.dense), sparse, cold


def stored_bytes(model: torch.jit.ScriptModule) -> Dict[str, int]:
    """The bytes of the artifact's tensors by part: the ID tables (fp32 rows, or int8 rows with their scale and
    bias, as fbgemm lays them out), the remap's kept row numbers (the trace stores them as int32 constants; the
    model's own constants are int64), the item-text table, and every other tensor (the dense layers, mostly)."""
    parts = {"id_table_bytes": 0, "remap_bytes": 0, "text_table_bytes": 0, "other_tensor_bytes": 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".sparse_arch." in name:
            part = "id_table_bytes"
        elif name.startswith("_tensor_constant") and tensor.dtype == torch.int32:
            part = "remap_bytes"
        elif ".item_text.embedding_bag_collection." in name:
            part = "text_table_bytes"
        else:
            part = "other_tensor_bytes"
        parts[part] += tensor.numel() * tensor.element_size()
    return parts


def score(artifact: Path, dense: np.ndarray, sparse: np.ndarray) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
    """Each task's predictions of the exported model.pt over the rows (in batches of BATCH), and its tensors'
    bytes by part."""
    import fbgemm_gpu  # noqa: F401  (registers the table operators the artifact calls)

    model = torch.jit.load(str(artifact))
    outputs: Dict[str, List[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(dense), BATCH):
            rows = slice(start, start + BATCH)
            part = model(torch.from_numpy(dense[rows]), torch.from_numpy(sparse[rows]))
            for name, values in part.items():
                outputs.setdefault(name, []).append(values.numpy())
    return {name: np.concatenate(values) for name, values in outputs.items()}, stored_bytes(model)


def metrics(kinds: Dict[str, str], predictions: Dict[str, np.ndarray], labels: Dict[str, np.ndarray],
            mask: np.ndarray) -> Dict[str, Dict[str, float]]:  # fmt: skip
    """Whole-set metrics of the masked rows, computed as training computes them (torchrec_mtl.train.metrics)."""
    rows = int(mask.sum())
    task_metrics = TaskMetrics(kinds, batch_size=rows, window_size=rows)
    task_metrics.update({n: torch.from_numpy(predictions[n][mask]) for n in kinds},
                        {n: torch.from_numpy(labels[n][mask]) for n in kinds})  # fmt: skip
    return task_metrics.compute()


def measure(trained: TrainedModel, run_dir: Path, setting: str) -> Dict:
    """Export ``trained`` in ``setting`` into ``run_dir/export_<setting>``, score the test split with its model.pt
    and return its sizes and metrics per segment (kept as ``run_dir/pruning_<setting>.json``: reused next time)."""
    cached = run_dir / f"pruning_{setting}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    quantize, pruning = SETTINGS[setting]
    # export quantizes the module it is given in place: each setting gets its own copy of the loaded model
    copied = dataclasses.replace(trained, inference=copy.deepcopy(trained.inference))
    folder = run_dir / f"export_{setting}"
    artifact = export(copied, folder, quantize=quantize, pruning=pruning)
    raw = artifact.read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    dense, sparse, cold = test_inputs(trained)
    predictions, parts = score(artifact, dense, sparse)
    saved = np.load(run_dir / "predictions.npz")  # the run's own test labels and scores, in the test split's order
    kinds = trained.task_kinds
    labels = {name: saved[f"{name}.label"] for name in kinds}
    if setting == "fp32":  # the unpruned artifact must score as the trained run did, or the comparison means nothing
        worst = max(float(np.abs(predictions[n] - saved[f"{n}.prediction"]).max()) for n in kinds)
        assert worst < 1e-3, f"{run_dir}: the fp32 artifact is {worst} off the run's own predictions"
    masks = {"all": np.ones(len(cold), dtype=bool), "cold": cold, "warm": ~cold}
    tables = ((manifest.get("pruned") or {}).get("rows") or {}).get("tables")
    kept = sum(t["kept"] for t in tables.values()) / sum(t["rows"] for t in tables.values()) if tables else 1.0
    # the remap holds each table's kept row numbers as int32 (torchrec_mtl.pruning.RowRemap), nothing more
    assert parts["remap_bytes"] == (4 * sum(t["kept"] for t in tables.values()) if tables else 0), parts
    result = {
        "size_bytes": len(raw), "size_gzip_bytes": len(gzip.compress(raw, 6)), "id_rows_kept": round(kept, 6), **parts,
        "segments": {name: metrics(kinds, predictions, labels, mask) for name, mask in masks.items() if mask.any()},
        "rows": {name: int(mask.sum()) for name, mask in masks.items()}, "pruned": manifest.get("pruned"),
    }  # fmt: skip
    cached.write_text(json.dumps(result, indent=2))
    shutil.rmtree(folder)  # a few MB per setting and seed; the sizes and the manifest's report are kept
    return result


def summarise(measured: List[Dict]) -> List[Dict]:
    """One row per (dataset, setting, task, segment): the headline metric's mean and spread over the seeds, and
    (``delta_mean``, ``delta_std``) its change from the fp32 export of the same seed's model, when measured."""
    rows = []
    for dataset in dict.fromkeys(m["dataset"] for m in measured):
        baseline = {m["seed"]: m for m in measured if m["dataset"] == dataset and m["setting"] == "fp32"}
        for setting in SETTINGS:
            group = [m for m in measured if m["dataset"] == dataset and m["setting"] == setting]
            if not group:
                continue
            size = round(float(np.mean([m["size_bytes"] for m in group])))
            extra = {"size_bytes": size, **{key: round(float(np.mean([m[key] for m in group]))) for key in SIZES},
                     "id_rows_kept": round(float(np.mean([m["id_rows_kept"] for m in group])), 4)}  # fmt: skip
            for segment in SEGMENTS:
                if not all(segment in m["segments"] for m in group):
                    continue
                for task, first in group[0]["segments"][segment].items():
                    metric = headline(first)
                    values = [m["segments"][segment][task][metric] for m in group]
                    labels = {"dataset": dataset, "setting": setting, "task": task, "segment": segment,
                              "metric": metric}  # fmt: skip
                    row = {**summary_row(labels, values, [m["seed"] for m in group]), **extra}
                    if setting != "fp32" and all(m["seed"] in baseline for m in group):
                        # paired by seed: the same model with and without pruning, so the seeds' spread cancels
                        base = [baseline[m["seed"]]["segments"][segment][task][metric] for m in group]
                        delta = mean_and_spread([v - b for v, b in zip(values, base)])
                        row.update(delta_mean=delta[0], delta_std=delta[1])
                    rows.append(row)
    return rows


def format_table(rows: List[Dict], segment: str) -> str:
    """One line per (dataset, setting): sizes, then each task's metric as mean ± std over seeds."""
    rows = [r for r in rows if r["segment"] == segment]
    columns = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    lines = [f"{segment} test rows\n{'dataset':<10}{'setting':<24}{'rows kept':>10}{'model.pt':>11}{'gzip':>11}"
             f"{'ID tables':>11}" + "".join(f"{t + ' ' + m:>20}" for t, m in columns)]  # fmt: skip
    for dataset, setting in dict.fromkeys((r["dataset"], r["setting"]) for r in rows):
        cells = {r["task"]: r for r in rows if r["dataset"] == dataset and r["setting"] == setting}
        first = next(iter(cells.values()))
        lines.append(f"{dataset:<10}{setting:<24}{first['id_rows_kept']:>10.2f}{first['size_bytes'] / 2**20:>8.2f}MiB"
                     f"{first['size_gzip_bytes'] / 2**20:>8.2f}MiB"
                     f"{(first['id_table_bytes'] + first['remap_bytes']) / 2**20:>8.2f}MiB"
                     + "".join(f"{cells[t]['mean']:>11.4f} ± {cells[t]['std']:.4f}" for t, _ in columns))  # fmt: skip
    return "\n".join(lines)


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def _cell(row: Dict) -> str:
    """mean ± std over seeds; beside a pruned or int8 setting's mean, its paired change from fp32 (mean ± std)."""
    if "delta_mean" not in row:
        return f"{row['mean']:.4f} ± {row['std']:.4f}"
    delta = row["delta_mean"] if round(row["delta_mean"], 4) else 0.0  # no "-0.0000"
    return f"{row['mean']:.4f} ({delta:+.4f} ± {row['delta_std']:.4f})".replace("-", "−")


def markdown(rows: List[Dict]) -> str:
    """The tables of docs/results.md, per dataset: sizes and each task's metric on all test rows, then on cold and
    warm rows (mean ± std over the seeds)."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        tasks = list(dict.fromkeys((r["task"], r["metric"]) for r in mine))
        cell = {(r["setting"], r["task"], r["segment"]): r for r in mine}
        settings = list(dict.fromkeys(r["setting"] for r in mine))
        seeds = len(mine[0]["seeds"])
        out.append(f"{dataset}, {seeds} seeds, all test rows:\n")
        out.append("| setting | ID rows kept | model.pt | gzip | ID tables + remap | "
                   + " | ".join(f"{t} {m}" for t, m in tasks) + " |")  # fmt: skip
        out.append("|---" * (5 + len(tasks)) + "|")
        for setting in settings:
            first = cell[(setting, tasks[0][0], "all")]
            sizes = [f"{first['id_rows_kept']:.2f}", _mib(first["size_bytes"]), _mib(first["size_gzip_bytes"]),
                     _mib(first["id_table_bytes"] + first["remap_bytes"])]  # fmt: skip
            metrics = [_cell(cell[(setting, t, "all")]) for t, _ in tasks]
            out.append(f"| {setting} | " + " | ".join(sizes + metrics) + " |")
        segments = [s for s in ("cold", "warm") if (settings[0], tasks[0][0], s) in cell]
        out.append(f"\n{dataset}, cold and warm test rows:\n")
        out.append("| setting | " + " | ".join(f"{t} {m} {s}" for t, m in tasks for s in segments) + " |")
        out.append("|---" * (1 + len(tasks) * len(segments)) + "|")
        for setting in settings:
            values = [_cell(cell[(setting, t, s)]) for t, _ in tasks for s in segments]
            out.append(f"| {setting} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--synthetic-rows", type=int, default=1_000_000,
                        help="rows of the generated synthetic log (data.generate.num_rows; default 1,000,000)")
    parser.add_argument("--out", required=True, help="JSON file for the summary rows")
    parser.add_argument("--runs", default="runs/compare_pruning", help="folder for each run and its measurements")
    parser.add_argument("--markdown", default=None, help="also write the tables of docs/results.md to this file")
    args = parser.parse_args(argv)
    quiet()
    measured = []
    for dataset in args.datasets:
        overrides = [*ONE_PASS, "training.progress=false"]
        if dataset == "synthetic":
            overrides.append(f"data.generate.num_rows={args.synthetic_rows}")
        for seed in args.seeds:
            run_dir = Path(args.runs) / dataset / f"seed{seed}"
            config = load_config(CONFIGS[dataset], [*overrides, f"training.seed={seed}", f"out_dir={run_dir}"])
            if dataset == "movielens":
                ensure_movielens(config.data.dir)
            run_or_reuse(config, f"{dataset} seed {seed}")
            trained = load_trained(run_dir / "checkpoints")
            for setting in args.settings:
                print(f"== {dataset} seed {seed}: {setting}", flush=True)
                measured.append({"dataset": dataset, "seed": seed, "setting": setting,
                                 **measure(trained, run_dir, setting)})  # fmt: skip
    rows = summarise(measured)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    for segment in SEGMENTS:
        print(format_table(rows, segment) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
