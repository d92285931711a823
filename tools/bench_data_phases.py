"""The measured phases of tools/bench_data.py (see its docstring): the two preprocessing paths, each in a spawned
child process, and the loader and the training step, in this process, with the machine's contention over each."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "configs" / "datasets" / "criteo_terabyte.yaml"
BATCH_SIZE = 1024


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


def child_preprocess(log: str, out_dir: str, result: str) -> None:
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


def child_torchrec(head: str, out_dir: str, threads: int, result: str) -> None:
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


def child_polars(log: str, out_dir: str, rows: int, result: str) -> None:
    """polars' own ``read_csv`` of the log into one in-memory frame (the label as Int8, the integer columns as
    Int64, the categorical tokens as strings): the fastest plain parse of the file there is, with no vocabulary,
    hashing or shards. ``rows`` > 0 reads that many lines from the top instead of the whole file. Its threads are
    POLARS_MAX_THREADS (the parent sets it before spawning)."""
    import polars as pl

    from torchrec_mtl.data.criteo_format import NUM_CATEGORICAL, NUM_INTEGER

    schema = {"label": pl.Int8, **{f"I{i + 1}": pl.Int64 for i in range(NUM_INTEGER)},
              **{f"C{i + 1}": pl.String for i in range(NUM_CATEGORICAL)}}  # fmt: skip
    started = time.perf_counter()
    frame = pl.read_csv(log, has_header=False, separator="\t", schema=schema, quote_char=None,
                        n_rows=rows if rows > 0 else None)  # fmt: skip
    seconds = time.perf_counter() - started
    Path(result).write_text(
        json.dumps(
            {
                "rows": frame.height,
                "seconds": seconds,
                "bytes_in_memory": frame.estimated_size(),
                "threads": pl.thread_pool_size(),
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
    from torchrec_mtl.build import build_model, seed_everything
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
