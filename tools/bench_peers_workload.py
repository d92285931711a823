"""The workload of tools/bench_peers.py (see its docstring): one generated log, its two schemas (the peers' table
sizes and Criteo Kaggle's), our config over it, and the rows the peers read, exported from our preprocessed shards.

The log (``log.tsv``, tab-separated, no header): ``click`` and ``conversion`` (0/1; conversion only on clicked rows),
``I1..I13`` (counts) and ``C1..C26`` (decimal IDs). Each categorical column draws popularity ranks from a truncated
Zipf law (p(rank k) proportional to (k + 1) ** -ZIPF_EXPONENT, as item popularity roughly is in public logs) over its
peers'-size vocabulary, mapped to IDs by a fixed permutation. Labels have signal, so that test AUCs mean something:
the click logit sums a user and an item bias, a user-item dot product (4 latent dimensions), biases of four more
columns and two dense counts; the conversion logit (on clicked rows) has an item bias and a dot product of its own.

Both schemas hash the IDs (``{hash_size: N}``: row ``1 + id % (N - 1)``), so one file gives exact table sizes:

- ``peers``: the item column 200,000 rows, the user column 100,000, the other 24 from 4 to 50,000 (geometric);
- ``criteo``: the 26 Criteo Kaggle cardinalities (33.8M rows in all), the largest on the columns the peers' schema
  makes largest (the item on the 10.1M-row table, the user on the 8.4M-row one), so the IDs keep spreading over them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import polars as pl

GENERATOR_VERSION = 1
NUM_DENSE = 13
NUM_SPARSE = 26
ZIPF_EXPONENT = 1.05
LATENT_DIM = 4
# The Criteo Display Advertising Challenge (Kaggle) cardinalities of C1..C26, as DLRM's Kaggle preprocessing counts
# them (every token of the 7 training days): 33,762,577 rows in all.
CRITEO_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # fmt: skip
ITEM_ROWS, USER_ROWS = 200_000, 100_000
LABELS = ("click", "conversion")


def categorical_names() -> List[str]:
    return [f"C{i}" for i in range(1, NUM_SPARSE + 1)]


def peers_sizes(divide: int = 1) -> Dict[str, int]:
    """Column -> table rows of the peers' workload: the item and user tables, the rest geometric from 4 to 50,000,
    placed by the rank of the Criteo cardinalities (the largest peers' table on the largest Criteo column).
    ``divide`` shrinks every table (at least 2 rows; a smoke run's)."""
    others = np.geomspace(4, 50_000, NUM_SPARSE - 2).round().astype(int).tolist()
    by_size = sorted([ITEM_ROWS, USER_ROWS, *others], reverse=True)
    order = np.argsort(CRITEO_KAGGLE)[::-1]  # column indices, largest Criteo table first
    sizes = {categorical_names()[int(column)]: rows for column, rows in zip(order, by_size)}
    return {name: max(2, sizes[name] // divide) for name in categorical_names()}


def criteo_sizes(divide: int = 1) -> Dict[str, int]:
    """Column -> table rows at Criteo Kaggle's cardinalities (``divide``: shrunk, for a smoke run)."""
    return {name: max(2, rows // divide) for name, rows in zip(categorical_names(), CRITEO_KAGGLE)}


def user_and_item(sizes: Dict[str, int]) -> tuple[str, str]:
    """The columns holding the user (the second-largest table) and the item (the largest)."""
    ordered = sorted(sizes, key=sizes.get, reverse=True)
    return ordered[1], ordered[0]


# ---------------------------------------------------------------------------------------------------- the log


def zipf_ids(rng: np.random.Generator, vocabulary: int, size: int) -> np.ndarray:
    """``size`` IDs in [0, vocabulary): Zipf-drawn popularity ranks mapped by a fixed random permutation."""
    cdf = np.cumsum(np.arange(1, vocabulary + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right").clip(max=vocabulary - 1)
    return rng.permutation(vocabulary)[ranks]


def make_log(rows: int, sizes: Dict[str, int], seed: int) -> pl.DataFrame:
    """The labelled log (module docstring); IDs of column c lie in [0, sizes[c] - 1), one per hashed table row."""
    rng = np.random.default_rng(seed)
    user, item = user_and_item(sizes)
    ids = {name: zipf_ids(rng, max(1, rows_ - 1), rows) for name, rows_ in sizes.items()}
    counts = np.floor(rng.lognormal(1.0, 1.2, size=(rows, NUM_DENSE))).astype(np.int64)
    dense = np.log1p(counts)
    dense = (dense - dense.mean(0)) / (dense.std(0) + 1e-9)

    def table(name: str, scale: float, dim: int = 1) -> np.ndarray:
        """Per-row values of a random table over column ``name``'s IDs."""
        return (rng.normal(0.0, scale, size=(sizes[name], dim)))[ids[name]]

    extra = [c for c in sorted(sizes, key=sizes.get, reverse=True) if c not in (user, item)][:4]
    click_logit = (
        -2.3 + table(user, 0.5)[:, 0] + table(item, 0.6)[:, 0]
        + 0.6 * (table(user, 1.0, LATENT_DIM) * table(item, 1.0, LATENT_DIM)).sum(1) / np.sqrt(LATENT_DIM)
        + sum(table(name, 0.3)[:, 0] for name in extra) + 0.4 * dense[:, 0] - 0.3 * dense[:, 1]
    )  # fmt: skip
    convert_logit = (
        -1.4 + table(item, 0.7)[:, 0] + 0.3 * dense[:, 2]
        + 0.6 * (table(user, 1.0, LATENT_DIM) * table(item, 1.0, LATENT_DIM)).sum(1) / np.sqrt(LATENT_DIM)
    )  # fmt: skip
    click = rng.random(rows) < 1.0 / (1.0 + np.exp(-click_logit))
    conversion = click & (rng.random(rows) < 1.0 / (1.0 + np.exp(-convert_logit)))
    columns: Dict[str, Any] = {"click": click.astype(np.int8), "conversion": conversion.astype(np.int8)}
    columns.update({f"I{j + 1}": counts[:, j] for j in range(NUM_DENSE)})
    columns.update(ids)
    return pl.DataFrame(columns)


def schema_dict(name: str, sizes: Dict[str, int]) -> Dict[str, Any]:
    """A dataset schema (torchrec_mtl.schema) for the log, each column hashed to ``sizes[column]`` rows."""
    user, item = user_and_item(peers_sizes())
    return {
        "name": name, "labels": {label: "binary" for label in LABELS},
        "integer": [f"I{j}" for j in range(1, NUM_DENSE + 1)], "categorical": categorical_names(),
        "categorical_format": "decimal", "vocabulary": {"min_count": 1},
        "feature_vocabulary": {column: {"hash_size": int(rows)} for column, rows in sizes.items()},
        "user_id": user, "item_id": item,
    }  # fmt: skip


def ensure_workload(folder: Path, rows: int, seed: int, divide: int = 1) -> Dict[str, Path]:
    """``folder/log.tsv`` and its schemas ``schema_peers.json``, ``schema_criteo.json`` (JSON is YAML), written
    unless ``folder/workload.json`` says they were written with the same parameters. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"rows": rows, "seed": seed, "divide": divide, "generator_version": GENERATOR_VERSION}
    paths = {"log": folder / "log.tsv", "peers": folder / "schema_peers.json", "criteo": folder / "schema_criteo.json"}
    marker = folder / "workload.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == params and paths["log"].exists():
        return paths
    sizes = peers_sizes(divide)
    partial = paths["log"].with_name("log.tsv.partial")
    make_log(rows, sizes, seed).write_csv(partial, separator="\t", include_header=False)
    os.replace(partial, paths["log"])
    paths["peers"].write_text(json.dumps(schema_dict("bench_peers", sizes), indent=1))
    paths["criteo"].write_text(json.dumps(schema_dict("bench_peers_criteo", criteo_sizes(divide)), indent=1))
    marker.write_text(json.dumps({"params": params, "bytes": paths["log"].stat().st_size}, indent=1))
    return paths


# ---------------------------------------------------------------------------------------------------- our config


def ours_raw_config(
    paths: Dict[str, Path], schema: str, work: Path, interaction: str, batch_size: int, seed: int
) -> Dict[str, Any]:
    """Our job on the log, at the peers' settings (the workload's: embedding dim 16, MMoE 4 experts [256, 128],
    towers [64], batch ``batch_size``), with our default ESMM objective minus the rating (CTR; CVR on clicked rows,
    inverse-propensity weighted; CTCVR = CTR x CVR), one pass over the training rows, a fifth of the rows for test.
    What it leaves at its defaults is what a user gets, diagnostics included; what it changes shows nothing and
    writes nothing that training needs (progress bar, checkpoints). ``out_dir`` is set per run."""
    return {
        "data": {"dir": str(paths["log"].parent), "schema": str(paths[schema]), "train": [paths["log"].name],
                 "test": [], "test_fraction": 0.2, "shards": str(work / f"shards_{schema}"),
                 "validation_fraction": 0.0},
        "model": {"embedding_dim": 16, "interaction": {"kind": interaction}, "text": None,
                  "tower": {"kind": "mmoe", "num_experts": 4, "expert_layer_sizes": [256, 128],
                            "tower_layer_sizes": [64]}},
        "objective": {"tasks": {"ctr": {"label": "click", "kind": "binary", "weight": 1.0},
                                "cvr": {"label": "conversion", "kind": "binary", "weight": 0.3, "given": "ctr",
                                        "ips": True}},
                      "products": {"ctcvr": {"of": ["ctr", "cvr"], "weight": 1.0}}},
        "training": {"batch_size": batch_size, "epochs": 1, "early_stopping": None, "progress": False, "seed": seed},
        "checkpoint": {"every_seconds": 0, "at_end": False, "resume": "never"},
        "out_dir": str(work / "runs" / "unset"),
    }  # fmt: skip


# Our trainer at the peers' recipe, for a comparison of like with like: their MMoE input (the 13 dense values raw
# beside the embeddings, 429 wide), their optimizer (Adam at 1e-3 on every parameter; Adam tables go data-parallel on
# CPU) and their loss (CTR on every row plus CVR on clicked rows, summed over the batch, which weighs a clicked row's
# CVR term as much as a row's CTR term: weight 0.14, the log's click rate, on our mean over clicked rows; no IPS, no
# CTCVR term, though CTCVR is still scored).
CLICK_RATE = 0.14
PEERS_RECIPE = ["model.interaction.kind=concat", "model.dense_arch_layer_sizes=[]", "training.embedding_optimizer=adam",
                "training.embedding_lr=0.001", "training.dense_lr=0.001", "objective.tasks.cvr.ips=false",
                f"objective.tasks.cvr.weight={CLICK_RATE}", "objective.products.ctcvr.weight=0"]  # fmt: skip

# Our default diagnostics (torchrec_mtl.config.sections): the training curve's windowed metrics (with the gates'
# entropy and usage on a gated tower) every 200 steps, and the cosine between the loss terms' gradients every 100.
DIAGNOSTICS_OFF = ["training.curve_every=0", "objective.gradient_cosine_every=0"]


# ---------------------------------------------------------------------------------------------------- the peers' rows


def export_rows(raw: Dict[str, Any], folder: Path, step_rows: int) -> Dict[str, Path]:
    """Preprocess ``raw``'s log (reused when done) and write the rows the peers read, unless written from the same
    shards: ``rows.npz`` (train and test: dense, sparse, ``ctr``, ``cvr``; tools/peer_runner.py's layout, the CVR label
    NaN off clicked rows), ``steps.npz`` (the first ``step_rows`` training rows, for the bare steps) and
    ``meta.json`` (feature names, table sizes, the model settings)."""
    from compare_peers import peer_arrays
    from torchrec_mtl.config import load_config
    from torchrec_mtl.data.prepare import prepare_shards
    from torchrec_mtl.data.shards import EncodedLog

    config = load_config(raw=raw)
    log = prepare_shards(config.data, progress=False)
    paths = {"rows": folder / "rows.npz", "steps": folder / "steps.npz", "meta": folder / "meta.json"}
    identity = {"fingerprint": log.metadata.get("fingerprint"), "step_rows": step_rows,
                "batch_size": config.training.batch_size}  # fmt: skip
    if paths["meta"].exists() and json.loads(paths["meta"].read_text()).get("identity") == identity:
        return paths
    rows = {split: EncodedLog.concat(log.split(split)) for split in ("train", "test")}
    arrays = peer_arrays(config, rows)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "rows.partial.npz", **arrays)
    os.replace(folder / "rows.partial.npz", paths["rows"])
    steps = {key.replace("train_", "step_"): value[:step_rows] for key, value in arrays.items()
             if key.startswith("train_")}  # fmt: skip
    np.savez(paths["steps"], **steps)
    model, tower = config.model, config.model.tower
    meta = {
        "identity": identity, "categorical": log.categorical_features, "dense": log.dense_features,
        "table_sizes": [log.table_sizes[f] for f in log.categorical_features],
        "rows": {split: len(rows[split]) for split in rows}, "embedding_dim": model.embedding_dim,
        "num_experts": tower.num_experts, "expert_layer_sizes": list(tower.expert_layer_sizes),
        "tower_layer_sizes": list(tower.tower_layer_sizes), "batch_size": config.training.batch_size,
        "eval_batch_size": config.training.eval_batch_size,
        "hash": hashlib.sha256(paths["rows"].read_bytes()[:1 << 20]).hexdigest()[:16],
    }  # fmt: skip
    paths["meta"].write_text(json.dumps(meta, indent=1))  # last: a half-written export is never taken as done
    return paths


def table_rows(meta_path: Path) -> Optional[int]:
    """The embedding rows of every table of an export, summed."""
    return int(sum(json.loads(meta_path.read_text())["table_sizes"])) if meta_path.exists() else None
