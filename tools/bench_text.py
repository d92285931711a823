#!/usr/bin/env python3
"""Cached item-text vectors against running the encoder on every batch, side by side in one run.

Two prepared main jobs (prepare_job: DistributedModelParallel + TrainPipelineSparseDist, MMoE) on
the same generated log, the same seed and so the same batches, differ only in where the item-text vector comes from:

- ``cached``: a lookup in the planner-sharded table of MiniLM vectors (``model.text``), encoded once beforehand;
- ``online``: the MiniLM run on each batch's item descriptions inside the training step (``model.text.online``,
  frozen BERT), every row's description encoded (``online_unique``: each distinct item of the batch once).

Each training step is timed (after warm-up steps) and the medians give samples/s; ``cached_over_online`` is the
ratio of the cached step's rate to the online one's (the whole step: embeddings, tower, backward, optimizers).
``text_feature_lookup_over_encode`` times the item-text arch alone on one batch: the lookup against the encoder. ``encode_items_per_s`` is the one-time encoding rate over every
item of the items file (sentences/s, batched, inference mode). Fixed threads; prints and writes JSON.

Example::

    .venv/bin/python tools/bench_text.py --out runs/bench_text.json
    .venv/bin/python tools/bench_text.py --online-steps 2 --cached-steps 20 --out /tmp/bench_text.json  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from common import quiet
from torchrec_mtl.config import load_config
from torchrec_mtl.run.prepare import PreparedJob, prepare_job
from torchrec_mtl.text.encoder import TextEncoder
from torchrec_mtl.text.table import read_items
from torchrec_mtl.train.distributed import init_distributed


def step_seconds(job: PreparedJob, steps: int, warmup: int) -> List[float]:
    """Wall time of each of ``steps`` pipelined training steps, after ``warmup`` untimed ones."""
    batches = iter(job.loader("train"))
    job.sharded.train()
    for _ in range(warmup):
        job.pipeline.progress(batches)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        job.pipeline.progress(batches)
        times.append(time.perf_counter() - started)
    return times


def text_feature_seconds(job: PreparedJob, repeats: int) -> float:
    """Median wall time of the item-text arch alone (lookup or encoding, then projection) on one training batch."""
    batch = next(iter(job.loader("train")))
    arch = job.sharded.module.model.item_text
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            arch(batch.sparse_features)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--data", default="runs/bench_text/data", help="folder for the generated log")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the generated log")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--cached-steps", type=int, default=40)
    parser.add_argument("--online-steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    env = init_distributed()

    common = [
        f"data.dir={args.data}",
        f"data.generate={{num_rows: {args.rows}, seed: 0}}",
        f"training.batch_size={args.batch_size}",
        "training.progress=false",
        "objective.gradient_cosine_every=0",
        "training.curve_every=0",
    ]
    figures: Dict[str, float] = {}
    timings: Dict[str, List[float]] = {}
    for name, text in (("cached", "{}"), ("online", "{online: true}"), ("online_unique", "{online: true}")):
        config = load_config(
            "configs/mmoe_synthetic.yaml", [*common, f"model.text={text}", f"out_dir=runs/bench_text/{name}"]
        )
        job = prepare_job(config, env)
        if name == "online":
            job.sharded.module.model.item_text.unique = False  # every row's description, as a naive online model does
        steps = args.cached_steps if name == "cached" else args.online_steps
        # before the pipeline's first step: it then reroutes the sharded tables' forward through its own stages
        figures[f"{name}_text_feature_seconds"] = round(text_feature_seconds(job, 5 if name == "cached" else 1), 6)
        timings[name] = step_seconds(job, steps, args.warmup)
        figures[f"{name}_samples_per_s"] = round(args.batch_size / statistics.median(timings[name]), 1)
        print(f"{name}: {figures[f'{name}_samples_per_s']:,.1f} samples/s (median of {steps} steps)", flush=True)
        del job

    _, descriptions = read_items(Path(args.data) / "items.tsv")
    encoder = TextEncoder()
    encoder.encode(descriptions, progress=False)
    result = {
        "cached_over_online": round(figures["cached_samples_per_s"] / figures["online_samples_per_s"], 1),
        "cached_over_online_unique": round(figures["cached_samples_per_s"] / figures["online_unique_samples_per_s"], 1),
        # the text feature alone (lookup + projection against encoding + projection), every row encoded
        "text_feature_lookup_over_encode": round(
            figures["online_text_feature_seconds"] / figures["cached_text_feature_seconds"], 1
        ),
        **figures,
        "encode_items_per_s": round(encoder.last_sentences_per_s, 1),
        "items": len(descriptions),
        "encoder": str(encoder.model_dir),
        "batch_size": args.batch_size,
        "step_seconds": {name: [round(t, 5) for t in times] for name, times in timings.items()},
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"cached over online: {result['cached_over_online']:,.1f}x (every row encoded), "
        f"{result['cached_over_online_unique']:,.1f}x (each distinct item of a batch once); the text feature alone "
        f"{result['text_feature_lookup_over_encode']:,.1f}x; "
        f"one-time encoding {result['encode_items_per_s']:,.1f} items/s\n-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
