"""Benchmark of the data pipeline on a Criteo-format log: preprocessing, loading, and the training step it feeds.

This is a benchmark, run by hand: it is not part of CI and not a test. With the defaults it writes a 10M-row
(about 2.4 GB) Criteo-format log and needs about 5 GB of disk under ``--work`` and a few GiB of memory.

What it measures, side by side in one run:

1. ``preprocess``: ``torchrec_mtl.data.preprocess`` over the whole log with the ``criteo_terabyte`` schema (hashed
   tables of 10M rows, every row to the train split), in a child process so that its peak RSS is its own.
2. ``torchrec``: torchrec's ``BinaryCriteoUtils.tsv_to_npys`` over the first ``--torchrec-rows`` lines of the same log
   (it holds all rows as Python lists, so the whole log would not fit), also in a child process. The rows/s of the
   two give ``preprocess_speedup``.
3. ``loader``: samples/s of iterating a shuffled ``BatchLoader`` (batch size 1024) over the preprocessed shards,
   counting everything from the start of an epoch (window reads included) over at least two 1M-row windows or the
   whole epoch if it is smaller.
4. ``train``: samples/s of the real training step (DistributedModelParallel + TrainPipelineSparseDist, default
   ``ModelConfig``: embedding dim 16, MMoE) over batches held in memory, so that the loader is not measured; tables
   are the terabyte sizes capped at ``--table-cap`` rows (ids folded modulo the cap), the objective is the CTR term
   alone. ``loader_over_train`` > 1 means the loader keeps up with training.

The machine must be quiet: ``contention`` records, for the loader and training phases, the CPU seconds this process
used per wall second and the share of the time some task waited for a CPU (Linux PSI). On a shared 2-core machine
another process made the 2-thread training step 10-20x slower (OpenMP threads waiting on a descheduled peer); a
note is printed when that share or the load average is high.

Peak RSS is the child's ``VmHWM`` (its own high-water mark since exec; ``ru_maxrss`` of a spawned child may also
count the parent's memory at fork time). Both child timings exclude interpreter start and imports.

Example::

    .venv/bin/python tools/bench_data.py --out runs/bench_data/results.json
    .venv/bin/python tools/bench_data.py --rows 200000 --torchrec-rows 50000 --work /tmp/bench_data_smoke \\
        --out /tmp/bench_data_smoke.json   # a quick smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "configs" / "datasets" / "criteo_terabyte.yaml"
BATCH_SIZE = 1024
GIB = float(1 << 30)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: the log and its head, reused when already written with the same parameters.


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _reusable(path: Path, wanted: dict) -> bool:
    sidecar = _sidecar(path)
    if not (path.exists() and sidecar.exists()):
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("params") == wanted and recorded.get("bytes") == path.stat().st_size


def _record(path: Path, params: dict) -> None:
    _sidecar(path).write_text(json.dumps({"params": params, "bytes": path.stat().st_size}, indent=2))


def ensure_log(work: Path, rows: int, seed: int, chunk_rows: int) -> Path:
    """``<work>/criteo_<rows>.tsv``, generated unless its sidecar says it was written with the same parameters."""
    from torchrec_mtl.data.criteo_format import write_criteo_log

    path = work / f"criteo_{rows}.tsv"
    params = {"rows": rows, "seed": seed, "chunk_rows": chunk_rows}
    if _reusable(path, params):
        print(f"reusing {path}", flush=True)
        return path
    partial = path.with_name(path.name + ".partial")
    started = time.perf_counter()
    write_criteo_log(partial, rows, seed=seed, chunk_rows=chunk_rows)
    os.replace(partial, path)
    _record(path, params)
    print(f"wrote {path} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def ensure_head(work: Path, log: Path, rows: int) -> Path:
    """``<work>/head_<rows>.tsv``: the first ``rows`` lines of ``log`` (rewritten when ``log`` changed)."""
    path = work / f"head_{rows}.tsv"
    params = {"rows": rows, "source": str(log), "source_sidecar": json.loads(_sidecar(log).read_text())}
    if _reusable(path, params):
        print(f"reusing {path}", flush=True)
        return path
    partial = path.with_name(path.name + ".partial")
    with open(log, "rb") as source, open(partial, "wb") as out:
        out.writelines(itertools.islice(source, rows))
    os.replace(partial, path)
    _record(path, params)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The two preprocessing paths, each in its own (spawned) process.


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_preprocess(log: str, out_dir: str, result: str) -> None:
    from torchrec_mtl.data.preprocess import preprocess
    from torchrec_mtl.schema import DatasetSchema

    schema = DatasetSchema.from_yaml(str(SCHEMA))
    started = time.perf_counter()
    summary = preprocess(schema, {"train": [log]}, out_dir, test_fraction=0.0, progress=True)
    seconds = time.perf_counter() - started
    Path(result).write_text(
        json.dumps(
            {
                "rows": summary.rows_read,
                "rows_written": summary.total_written,
                "rows_rejected": summary.rows_rejected,
                "seconds": seconds,
                "peak_rss_bytes": _peak_rss_bytes(),
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def _child_torchrec(head: str, out_dir: str, threads: int, result: str) -> None:
    import numpy as np
    import torch
    from torchrec.datasets.criteo import BinaryCriteoUtils

    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(out / f"{part}.npy") for part in ("dense", "sparse", "labels")]
    started = time.perf_counter()
    BinaryCriteoUtils.tsv_to_npys(head, *files)
    seconds = time.perf_counter() - started
    rows = int(np.load(files[2], mmap_mode="r").shape[0])
    Path(result).write_text(
        json.dumps(
            {
                "rows": rows,
                "seconds": seconds,
                "peak_rss_bytes": _peak_rss_bytes(),
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def run_child(name: str, target: Callable, *args) -> dict:
    """Run ``target(*args, result_path)`` in a spawned process and return the dict it wrote."""
    result = Path(args[1]).with_name(f"{name}.result.json")
    result.unlink(missing_ok=True)
    process = mp.get_context("spawn").Process(target=target, args=(*args, str(result)), name=f"bench-{name}")
    process.start()
    process.join()
    if process.exitcode != 0 or not result.exists():
        raise RuntimeError(f"{name}: the child process failed (exit code {process.exitcode})")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Loader and training step, in this process.


def _cpu_stall_us() -> int | None:
    """Microseconds, since boot, that some runnable task waited for a CPU (Linux PSI); None where unavailable."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split()[4].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


class Contention:
    """Over a timed phase: this process's CPU seconds per wall second, and the share of the wall time some task on
    the machine waited for a CPU. On a quiet machine the first is about the threads used and the second near 0;
    other work on the machine lowers the first and raises the second (and every figure is then suspect)."""

    def __enter__(self) -> Self:
        self.wall, self.cpu, self.stall = time.perf_counter(), time.process_time(), _cpu_stall_us()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall
        stall = _cpu_stall_us()
        self.result = {
            "cpu_per_wall": round((time.process_time() - self.cpu) / wall, 2),
            "cpu_stalled_share": None
            if stall is None or self.stall is None
            else round((stall - self.stall) / 1e6 / wall, 3),
        }


def bench_loader(shards_dir: Path, min_batches: int) -> dict:
    """Samples/s of a shuffled BatchLoader from the start of an epoch, window reads included."""
    from tqdm import tqdm

    from torchrec_mtl.data.loader import BatchLoader
    from torchrec_mtl.data.shards import ShardedLog

    log = ShardedLog.open(shards_dir)
    loader = BatchLoader(log.split("train"), log.categorical_features, BATCH_SIZE, shuffle=True, seed=0)
    # at least two windows (the loader reads ~window_rows rows at a time, then batches them), or the whole epoch
    batches = min(len(loader), max(min_batches, math.ceil(2 * loader.window_rows / BATCH_SIZE)))
    if batches == 0:
        raise ValueError(f"{shards_dir}: fewer than {BATCH_SIZE} rows; nothing to load")
    loader.set_epoch(1)  # warm-up on another epoch's order: imports, page cache, allocator
    for _ in zip(range(5), loader):
        pass
    loader.set_epoch(0)
    count = 0
    with Contention() as contention:
        started = time.perf_counter()
        for _ in tqdm(zip(range(batches), loader), total=batches, desc="loader", unit="batch", leave=False):
            count += 1
        seconds = time.perf_counter() - started
    return {
        "batches": count,
        "epoch_batches": len(loader),
        "windows": math.ceil(count * BATCH_SIZE / loader.window_rows),
        "seconds": seconds,
        "samples_per_s": count * BATCH_SIZE / seconds,
        "contention": contention.result,
    }


def _training_batches(shards_dir: Path, count: int, table_cap: int) -> list:
    """``count`` batches in memory, ready for the model: ids folded into the capped tables."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_mtl.data.batch import MultiTaskBatch
    from torchrec_mtl.data.loader import BatchLoader
    from torchrec_mtl.data.shards import ShardedLog

    log = ShardedLog.open(shards_dir)
    loader = BatchLoader(log.split("train"), log.categorical_features, BATCH_SIZE, shuffle=True, seed=1)
    if len(loader) == 0:
        raise ValueError(f"{shards_dir}: fewer than {BATCH_SIZE} rows; nothing to train on")
    batches = []
    for batch in itertools.islice(itertools.cycle(loader), count):
        kjt = batch.sparse_features
        # the shards hold rows of 10M-row hashed tables; the benchmark's tables have table_cap rows
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=kjt.keys(), values=kjt.values() % table_cap, lengths=kjt.lengths()
        )
        batches.append(MultiTaskBatch(batch.dense_features, sparse, batch.labels, batch.row_weight))
    return batches


def bench_train(shards_dir: Path, table_cap: int, warmup: int, steps: int) -> dict:
    """Samples/s of the sharded training step (TrainPipelineSparseDist) over batches held in memory."""
    import torch.distributed as dist
    from tqdm import tqdm

    from torchrec_mtl.config import ModelConfig, TrainingConfig
    from torchrec_mtl.data.shards import ShardedLog
    from torchrec_mtl.job import build_model, seed_everything
    from torchrec_mtl.model import MultiTaskTrain
    from torchrec_mtl.tasks import MultiTaskObjective, TaskSet, TaskSpec
    from torchrec_mtl.train.distributed import init_distributed, shard_model
    from torchrec_mtl.train.loop import make_pipeline

    log = ShardedLog.open(shards_dir)
    training = TrainingConfig()
    seed_everything(training.seed)
    env = init_distributed()
    table_sizes = {feature: min(rows, table_cap) for feature, rows in log.table_sizes.items()}
    model = build_model(ModelConfig(), len(log.dense_features), table_sizes)
    # A Criteo log has only the click label: one declared task on the default tower (its other heads go unused).
    objective = MultiTaskObjective(TaskSet(tasks=(TaskSpec("ctr", "binary", "click"),)))
    sharded, optimizer = shard_model(
        MultiTaskTrain(model, objective),
        env,
        training.embedding_optimizer,
        training.embedding_lr,
        training.dense_lr,
        training.sharding_types,
    )
    pipeline = make_pipeline(sharded, optimizer, env.device)
    batches = _training_batches(shards_dir, warmup + steps, table_cap)
    sharded.train()
    iterator = iter(batches)
    losses = []
    for _ in range(warmup):
        losses.append(float(pipeline.progress(iterator)[0]))
    with Contention() as contention:
        started = time.perf_counter()
        for _ in tqdm(range(steps), desc="train", unit="step", leave=False):
            losses.append(float(pipeline.progress(iterator)[0]))
        seconds = time.perf_counter() - started
    dist.destroy_process_group()
    return {
        "steps": steps,
        "warmup": warmup,
        "seconds": seconds,
        "samples_per_s": steps * BATCH_SIZE / seconds,
        "table_sizes": table_sizes,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "contention": contention.result,
    }


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the generated log")
    parser.add_argument("--torchrec-rows", type=int, default=1_000_000, help="head rows for torchrec's tsv_to_npys")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_data"), help="folder for generated files")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--threads", type=int, default=2, help="torch and polars threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated log")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows generated at a time")
    parser.add_argument("--table-cap", type=int, default=1_000_000, help="embedding rows per table at most")
    parser.add_argument("--loader-batches", type=int, default=300, help="loader batches at least (2 windows' worth)")
    parser.add_argument("--train-warmup", type=int, default=10, help="training steps before timing")
    parser.add_argument("--train-steps", type=int, default=100, help="training steps timed")
    return parser.parse_args(argv)


def format_table(results: dict) -> str:
    def number(value: float, digits: int = 0) -> str:
        return f"{value:,.{digits}f}"

    rows = [
        ("", "ours (preprocess)", "torchrec (tsv_to_npys)"),
        ("rows", number(results["rows"]), number(results["torchrec_rows"])),
        ("seconds", number(results["preprocess_seconds"], 1), number(results["torchrec_seconds"], 1)),
        ("rows/s", number(results["preprocess_rows_per_s"]), number(results["torchrec_rows_per_s"])),
        ("peak RSS GiB", number(results["preprocess_peak_rss_gib"], 2), number(results["torchrec_peak_rss_gib"], 2)),
        ("speedup (ours/torchrec)", number(results["preprocess_speedup"], 1) + "x", ""),
        ("", "", ""),
        ("loader samples/s", number(results["loader_samples_per_s"]), f"{results['loader_batches']} batches"),
        ("train samples/s", number(results["train_samples_per_s"]), f"{results['train_steps']} steps"),
        ("loader / train", number(results["loader_over_train"], 1) + "x", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # before polars and torch start their pools, here and in the spawned children (which inherit the environment)
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    log = ensure_log(work, args.rows, args.seed, args.chunk_rows)
    log_bytes = log.stat().st_size
    print(f"log: {log} {log_bytes / 1e9:.2f} GB ({log_bytes / max(args.rows, 1):.0f} bytes/row)", flush=True)

    shards_dir = work / f"shards_{args.rows}"
    ours = run_child("preprocess", _child_preprocess, str(log), str(shards_dir))
    if ours["rows_rejected"]:
        print(f"warning: preprocessing rejected {ours['rows_rejected']:,} rows", flush=True)

    torchrec_rows = min(args.torchrec_rows, args.rows)
    head = ensure_head(work, log, torchrec_rows)
    theirs = run_child("torchrec", _child_torchrec, str(head), str(work / f"torchrec_{torchrec_rows}"), args.threads)

    loader = bench_loader(shards_dir, args.loader_batches)
    trained = bench_train(shards_dir, args.table_cap, args.train_warmup, args.train_steps)

    preprocess_rate = ours["rows"] / ours["seconds"]
    torchrec_rate = theirs["rows"] / theirs["seconds"]
    results = {
        "rows": ours["rows"],
        "log_bytes": log_bytes,
        "preprocess_rows_per_s": preprocess_rate,
        "preprocess_peak_rss_gib": ours["peak_rss_bytes"] / GIB,
        "preprocess_seconds": ours["seconds"],
        "preprocess_rows_rejected": ours["rows_rejected"],
        "torchrec_rows": theirs["rows"],
        "torchrec_rows_per_s": torchrec_rate,
        "torchrec_peak_rss_gib": theirs["peak_rss_bytes"] / GIB,
        "torchrec_seconds": theirs["seconds"],
        "preprocess_speedup": preprocess_rate / torchrec_rate,
        "batch_size": BATCH_SIZE,
        "loader_samples_per_s": loader["samples_per_s"],
        "loader_batches": loader["batches"],
        "loader_epoch_batches": loader["epoch_batches"],
        "loader_windows": loader["windows"],
        "loader_seconds": loader["seconds"],
        "train_samples_per_s": trained["samples_per_s"],
        "train_steps": trained["steps"],
        "train_warmup_steps": trained["warmup"],
        "train_seconds": trained["seconds"],
        "train_loss_first_last": [trained["first_loss"], trained["last_loss"]],
        "table_cap": args.table_cap,
        "table_sizes": trained["table_sizes"],
        "loader_over_train": loader["samples_per_s"] / trained["samples_per_s"],
        "contention": {"loader": loader["contention"], "train": trained["contention"]},
        "threads": args.threads,
        "seed": args.seed,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            # 1-minute load average before and after: other work on the machine skews every figure
            "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
    }
    print(format_table(results))
    print(f"contention (cpu per wall second, share of time some task waited for a cpu): {results['contention']}")
    stalled = [phase["cpu_stalled_share"] or 0.0 for phase in results["contention"].values()]
    if max(results["machine"]["loadavg_1min"]) > (os.cpu_count() or 1) + 1 or max(stalled) > 0.2:
        print(
            f"note: load average {results['machine']['loadavg_1min']}, cpu stalls {stalled}: the machine was busy "
            "with other work; the figures are suspect",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
