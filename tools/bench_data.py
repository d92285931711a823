"""Benchmark of the data pipeline on a Criteo-format log: preprocessing, loading, and the training step it feeds.

This is a benchmark, run by hand: it is not part of CI and not a test. With the defaults it writes a 10M-row
(about 2.4 GB) Criteo-format log and needs about 5 GB of disk under ``--work`` and a few GiB of memory.

What it measures, side by side in one run:

1. ``preprocess``: ``torchrec_mtl.data.preprocess`` over the whole log with the ``criteo_terabyte`` schema (hashed
   tables of 10M rows, every row to the train split), in a child process so that its peak RSS is its own.
2. ``torchrec``: torchrec's ``BinaryCriteoUtils.tsv_to_npys`` over the first ``--torchrec-rows`` lines of the same log
   (it holds all rows as Python lists, so the whole log would not fit), also in a child process. The rows/s of the
   two give ``preprocess_speedup``.
3. ``polars``: polars' own ``read_csv`` of the same log (the whole file, or its first ``--polars-rows`` lines) into
   one in-memory frame, in a child process: a stronger baseline than torchrec's converter, parsing alone (no
   vocabulary, hashing or shards written). ``preprocess_over_polars`` is our rows/s over its.
4. ``loader``: samples/s of iterating a shuffled ``BatchLoader`` (batch size 1024) over the preprocessed shards,
   counting everything from the start of an epoch (window reads included) over at least two 1M-row windows or the
   whole epoch if it is smaller.
5. ``train``: samples/s of the real training step (DistributedModelParallel + TrainPipelineSparseDist, default
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
import os
import platform
import sys
import time
from pathlib import Path

# the spawned children run functions of bench_data_phases, importable there too: tools/ is on their sys.path
from bench_data_phases import (
    BATCH_SIZE,
    bench_loader,
    bench_train,
    child_polars,
    child_preprocess,
    child_torchrec,
    run_child,
)

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the generated log")
    parser.add_argument("--torchrec-rows", type=int, default=1_000_000, help="head rows for torchrec's tsv_to_npys")
    parser.add_argument("--polars-rows", type=int, default=0, help="lines polars reads (0: the whole log)")
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

    def three(prefix: str, digits: int = 0) -> tuple:
        return tuple(number(results[f"{side}_{prefix}"], digits) for side in ("preprocess", "torchrec", "polars"))

    rows = [
        ("", "ours (preprocess)", "torchrec (tsv_to_npys)", "polars (read_csv)"),
        ("rows", number(results["rows"]), number(results["torchrec_rows"]), number(results["polars_rows"])),
        ("seconds", *three("seconds", 1)),
        ("rows/s", *three("rows_per_s")),
        ("peak RSS GiB", *three("peak_rss_gib", 2)),
        ("ours over it", "", number(results["preprocess_speedup"], 1) + "x",
         number(results["preprocess_over_polars"], 2) + "x"),
        ("", "", "", ""),
        ("loader samples/s", number(results["loader_samples_per_s"]), f"{results['loader_batches']} batches", ""),
        ("train samples/s", number(results["train_samples_per_s"]), f"{results['train_steps']} steps", ""),
        ("loader / train", number(results["loader_over_train"], 1) + "x", "", ""),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}".rstrip() for a, b, c, d in rows
    )


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
    ours = run_child("preprocess", child_preprocess, str(log), str(shards_dir))
    if ours["rows_rejected"]:
        print(f"warning: preprocessing rejected {ours['rows_rejected']:,} rows", flush=True)

    torchrec_rows = min(args.torchrec_rows, args.rows)
    head = ensure_head(work, log, torchrec_rows)
    theirs = run_child("torchrec", child_torchrec, str(head), str(work / f"torchrec_{torchrec_rows}"), args.threads)

    polars = run_child("polars", child_polars, str(log), str(work / "polars"), args.polars_rows)

    loader = bench_loader(shards_dir, args.loader_batches)
    trained = bench_train(shards_dir, args.table_cap, args.train_warmup, args.train_steps)

    preprocess_rate = ours["rows"] / ours["seconds"]
    torchrec_rate = theirs["rows"] / theirs["seconds"]
    polars_rate = polars["rows"] / polars["seconds"]
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
        "polars_rows": polars["rows"],
        "polars_rows_per_s": polars_rate,
        "polars_peak_rss_gib": polars["peak_rss_bytes"] / GIB,
        "polars_seconds": polars["seconds"],
        "polars_frame_gib": polars["bytes_in_memory"] / GIB,
        "polars_threads": polars["threads"],
        # ours (parse, vocabulary, shards written) over polars' bare parse into memory
        "preprocess_over_polars": preprocess_rate / polars_rate,
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