"""Preprocessing memory at scale: an N-row generated Criteo log through ``preprocess``, with one ID per column
(``single``) and with a 50-long history list column beside them (``list``).

Each case's log comes from the generator (torchrec_mtl.data.criteo_format) and ``preprocess`` reads it in a child
process whose peak RSS (``VmHWM``, its own high-water mark) is the figure:

- ``--stream fifo`` (default): the generator writes into a named pipe while the child reads it, so a 100M-row log
  (about 24 GB of text) never sits on disk; only the shards do (about 16 GB at 100M rows). Both share the CPUs, so
  rows/s is lower than in tools/bench_data.py.
- ``--stream file``: the log is written to ``--work`` first, chunk by chunk (never whole in memory), then
  preprocessed alone: rows/s is preprocessing's own, comparable across the cases.

The cases (``--cases``, default ``single``):

- ``single``: the ``criteo_terabyte`` schema (13 integer, 26 hashed categorical columns, 10M rows a table).
- ``list``: the same lines with a ``history`` column at the end, 0 to 60 hex tokens (uniform, about 30 a row; the
  largest column's vocabulary, Zipf-drawn), declared a list of ``max_length`` 50 (``keep: last``, the longer ones
  truncated) sharing that column's hashed table: the list-column path of preprocessing (each element split and
  checked, truncation, the padded list shards).
- ``list_vocabulary``: the ``list`` log with the shared column and the history mapped through one ``min_count: 2``
  vocabulary instead of hashed: the token counts, the raw list tokens kept beside each shard and mapped at the end.

Prints and writes (``--out``) per case the rows, rejections, truncated lists, preprocessing seconds and rows/s,
its peak RSS, the shards' bytes and the load average around it (rows/s falls when other processes share the CPUs).
A benchmark, run by hand (not in CI).

Example::

    .venv/bin/python tools/bench_data_scale.py --rows 100000000 --work runs/bench_scale --out runs/bench_data_100m.json
    nice -n 19 .venv/bin/python tools/bench_data_scale.py --rows 10000000 --cases single,list,list_vocabulary \\
        --stream file --work runs/bench_scale --out runs/bench_data_lists_10m.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from torchrec_mtl.data.criteo_format import history_column, write_criteo_log

REPO = Path(__file__).resolve().parents[1]
CASES = ("single", "list", "list_vocabulary")
HISTORY_MAX = 60  # tokens written per row at most; the schema keeps the last 50
HISTORY_KEPT = 50


def case_schema(case: str, seed: int = 0) -> dict:
    """The schema of a case (a dict, as its YAML reads): criteo_terabyte, with the history list for ``list``."""
    raw = yaml.safe_load((REPO / "configs" / "datasets" / "criteo_terabyte.yaml").read_text())
    if case in ("list", "list_vocabulary"):
        shared = history_column(seed)
        raw["name"] = "criteo_terabyte_history"
        raw["categorical"] = [*raw["categorical"], "history"]
        raw["lists"] = {"history": {"separator": "|", "max_length": HISTORY_KEPT, "keep": "last", "pooling": "mean",
                                    "shares": shared}}  # fmt: skip
    if case == "list_vocabulary":  # the shared column and the history through one min_count vocabulary
        raw["name"] = "criteo_terabyte_history_vocabulary"
        raw["feature_vocabulary"] = {shared: {"min_count": 2}, "history": {"min_count": 2}}
    return raw


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(case: str, log: str, shards: str, result: str) -> int:
    """Preprocess ``log`` as ``case`` into ``shards``; write the seconds and this process's peak RSS to ``result``.
    Imports only the preprocessing code (polars, numpy), not torch."""
    from torchrec_mtl.data.preprocess import preprocess
    from torchrec_mtl.schema import DatasetSchema

    schema = DatasetSchema.from_dict(case_schema(case), source=f"bench_data_scale:{case}")
    started = time.perf_counter()
    summary = preprocess(schema, {"train": [log]}, shards, progress=False)
    seconds = time.perf_counter() - started
    Path(result).write_text(json.dumps({"seconds": seconds, "peak_rss_bytes": _peak_rss_bytes(),
                                        "rows_read": summary.rows_read}))  # fmt: skip
    return 0


def run_case(case: str, rows: int, work: Path, stream: str, keep: bool) -> dict:
    """Generate ``case``'s log (into a FIFO or a file under ``work``), preprocess it in a child, return the figures."""
    history_max = HISTORY_MAX if case != "single" else 0
    shards, result = work / f"shards_{case}", work / f"{case}.result.json"
    result.unlink(missing_ok=True)
    fifo_dir = None
    generated_seconds = None
    if stream == "fifo":
        fifo_dir = Path(tempfile.mkdtemp())
        log = fifo_dir / f"{case}.fifo"
        os.mkfifo(log)
    else:
        log = work / f"{case}.tsv"
        started = time.perf_counter()
        write_criteo_log(log, rows, seed=0, progress=True, history_max=history_max)
        generated_seconds = time.perf_counter() - started
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--child", case, str(log), str(shards), str(result)], cwd=REPO)
    if stream == "fifo":
        write_criteo_log(log, rows, seed=0, progress=True, history_max=history_max)
    code = child.wait()
    wall = time.perf_counter() - started
    figures = json.loads(result.read_text()) if code == 0 and result.exists() else {}
    metadata = json.loads((shards / "metadata.json").read_text()) if code == 0 else {}
    counts = metadata.get("counts", {})
    seconds = figures.get("seconds", wall)
    out = {
        "case": case,
        "schema": case_schema(case)["name"],
        "lists": case_schema(case).get("lists", {}),
        "rows": rows,
        "exit_code": code,
        "log_bytes": log.stat().st_size if stream == "file" else None,
        "generate_seconds": round(generated_seconds, 1) if generated_seconds is not None else None,
        "rows_read": counts.get("rows_read"),
        "rows_rejected": counts.get("rows_rejected"),
        "truncated_lists": counts.get("truncated_lists"),
        "preprocess_seconds": round(seconds, 1),
        # fifo: the child waits on the generator, which shares the CPUs
        ("rows_per_s" if stream == "file" else "rows_per_s_with_generator_sharing_the_cpus"): round(rows / seconds),
        "preprocess_peak_rss_gib": round(figures["peak_rss_bytes"] / 2**30, 3) if figures else None,
        "shard_bytes": sum(f.stat().st_size for f in shards.rglob("*.npy")) if code == 0 else None,
        # the machine's 1-minute load average before and after preprocessing: other processes share the CPUs
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    if stream == "file" and not keep:
        log.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(shards, ignore_errors=True)
    if fifo_dir is not None:
        shutil.rmtree(fifo_dir, ignore_errors=True)
    return out


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return _child(*sys.argv[2:6])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_scale"), help="where the logs and shards go")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--cases", default="single", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--stream", choices=("fifo", "file"), default="fifo",
                        help="the log through a named pipe (never on disk) or written to --work first")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the logs and shards (deleted by default)")
    args = parser.parse_args()
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = [case for case in cases if case not in CASES]
    if unknown or not cases:
        parser.error(f"--cases: {unknown or args.cases!r}; allowed: {', '.join(CASES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"rows": args.rows, "stream": args.stream, "cases": {}}
    code = 0
    for case in cases:
        results["cases"][case] = run_case(case, args.rows, args.work, args.stream, args.keep)
        code = code or results["cases"][case]["exit_code"]
        print(json.dumps(results["cases"][case], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
