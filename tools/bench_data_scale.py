"""Preprocessing memory at scale: stream an N-row generated Criteo log through a named pipe into ``preprocess``.

The generator (torchrec_mtl.data.criteo_format) writes into a FIFO and ``torchrec-mtl preprocess`` reads it in a
child process, so a 100M-row log (about 24 GB of text) never sits on disk; only the shards do (about 16 GB at 100M
rows). Peak RSS is the preprocessing child's (it imports only polars, numpy and the preprocessing code). Prints and writes (``--out``) the rows, seconds and the preprocessing child's peak RSS, to set beside
tools/bench_data.py's 10M-row figure. A benchmark, run by hand (not in CI); both processes share the machine, so
rows/s here is lower than in tools/bench_data.py.

Example::

    .venv/bin/python tools/bench_data_scale.py --rows 100000000 --work runs/bench_scale --out runs/bench_data_100m.json
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

from torchrec_mtl.data.criteo_format import write_criteo_log

REPO = Path(__file__).resolve().parents[1]


def _child(fifo: str, shards: str) -> int:
    from torchrec_mtl.data.preprocess import preprocess
    from torchrec_mtl.schema import DatasetSchema

    schema = DatasetSchema.from_yaml(REPO / "configs" / "datasets" / "criteo_terabyte.yaml")
    preprocess(schema, {"train": [fifo]}, shards, progress=False)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return _child(*sys.argv[2:4])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_scale"), help="where the shards go")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--keep", action="store_true", help="keep the shards (deleted by default)")
    args = parser.parse_args()
    fifo = Path(tempfile.mkdtemp()) / "criteo.fifo"
    os.mkfifo(fifo)
    shards = args.work / "shards"
    started = time.perf_counter()
    # the child imports only the preprocessing code (as tools/bench_data.py's child does), not torch
    child = subprocess.Popen([sys.executable, __file__, "--child", str(fifo), str(shards)], cwd=REPO)
    write_criteo_log(fifo, args.rows, seed=0, progress=True)
    code = child.wait()
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB; the only child
    metadata = json.loads((shards / "metadata.json").read_text()) if code == 0 else {}
    results = {
        "rows": args.rows,
        "exit_code": code,
        "rows_read": metadata.get("counts", {}).get("rows_read"),
        "rows_rejected": metadata.get("counts", {}).get("rows_rejected"),
        "seconds": round(seconds, 1),
        "rows_per_s_with_generator_sharing_the_cpus": round(args.rows / seconds),
        "preprocess_peak_rss_gib": round(peak_gib, 3),
        "shard_bytes": sum(f.stat().st_size for f in shards.rglob("*.npy")) if code == 0 else None,
    }
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(shards, ignore_errors=True)
    shutil.rmtree(fifo.parent, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
