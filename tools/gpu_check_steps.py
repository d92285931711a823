#!/usr/bin/env python3
"""The steps of tools/gpu_check.sh that are more than one CLI command, each writing one JSON file:

- ``env``: the stack and the device (torch, CUDA, the GPU's name and memory, fbgemm_gpu, torchrec); exits 1 when the
  device cannot be used (CUDA asked for and absent), so the check stops before it trains;
- ``predict``: ``torchrec-mtl predict`` on a log, timed, with its counts;
- ``export-check``: the fp32 and int8 TorchScript artifacts loaded onto the device and run on test rows, against the
  checkpoint's model loaded there (load_trained): the largest difference per task;
- ``bench-note``: why tools/bench_train.py is not run on a GPU;
- ``summary``: every step's status and seconds, and the main job's figures under fp32, bf16 and fp16 side by side.

Example::

    .venv/bin/python tools/gpu_check_steps.py env --device cpu --dry-run 1 --out /tmp/check/env.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

BENCH_NOTE = (
    "tools/bench_train.py cannot time a GPU: its plain-PyTorch contenders stay on the host, its step timer does not "
    "synchronise CUDA, and its world-size-2 memory measure needs two devices. The GPU's training rate is "
    "train.json's training.samples_per_s."
)


def _write(path: str, document: Dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(document, indent=2))


def env(args: argparse.Namespace) -> int:
    import torch

    document: Dict[str, Any] = {
        "dry_run": args.dry_run == "1",
        "device": args.device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    for package in ("fbgemm_gpu", "torchrec"):
        try:
            document[package] = getattr(__import__(package), "__version__", "unknown")
        except Exception as error:  # noqa: BLE001 (a broken install is what this step reports)
            document[package] = f"not importable: {type(error).__name__}: {error}"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        document["gpus"] = torch.cuda.device_count()
        document["gpu"] = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
                           "capability": f"{properties.major}.{properties.minor}",
                           "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    _write(args.out, document)
    print(json.dumps(document, indent=2))
    broken = [p for p in ("fbgemm_gpu", "torchrec") if str(document[p]).startswith("not importable")]
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU visible to torch {torch.__version__}: run with --dry-run on a machine without one")
        return 1
    return 1 if broken else 0


def predict(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "torchrec_mtl.cli", "predict", "--checkpoint", args.checkpoint, "--input",
               args.input, "--out", args.scores, "--device", args.device, "--quiet"]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        return run.returncode
    counts = json.loads(run.stderr.strip().splitlines()[-1])  # predict's summary: the last line on stderr
    _write(args.out, {"device": args.device, "seconds": round(seconds, 2),
                      "lines_per_s": round(counts["lines"] / seconds, 1), **counts})  # fmt: skip
    return 0


def export_check(args: argparse.Namespace) -> int:
    import fbgemm_gpu  # noqa: F401  (registers the table operators the artifacts call)
    import torch

    from torchrec_mtl.inference import load_trained
    from torchrec_mtl.predict import _Encoder

    trained = load_trained(args.checkpoint, args.device)
    with Path(trained.config.data.dir, "test.tsv").open("rb") as log:
        chunk = b"".join(line for _, line in zip(range(args.rows), log))
    _, dense, sparse, _ = _Encoder(trained).encode(chunk, 1)
    dense, sparse = torch.from_numpy(dense).to(trained.device), torch.from_numpy(sparse).to(trained.device)
    with torch.no_grad():
        expected = trained.inference(dense, sparse)
    document: Dict[str, Any] = {"device": str(trained.device), "rows": len(dense)}
    for name, folder in (("fp32", args.fp32), ("int8", args.int8)):
        model = torch.jit.load(str(Path(folder) / "model.pt"), map_location=trained.device)
        with torch.no_grad():
            outputs = model(dense, sparse)
        document[name] = {
            "manifest": json.loads((Path(folder) / "manifest.json").read_text()),
            "output_device": str(next(iter(outputs.values())).device),
            "max_abs_diff": {task: float((outputs[task] - values).abs().max()) for task, values in expected.items()},
        }
    _write(args.out, document)
    print(json.dumps({name: document[name]["max_abs_diff"] for name in ("fp32", "int8")}, indent=2))
    # fp32 scores the same; int8 tables measured 4e-4 on probabilities, 3e-3 on the rating (docs/operations.md)
    exact = max(document["fp32"]["max_abs_diff"].values()) <= 1e-4
    return 0 if exact and max(document["int8"]["max_abs_diff"].values()) <= 0.05 else 1


def bench_note(args: argparse.Namespace) -> int:
    _write(args.out, {"ran": False, "reason": BENCH_NOTE})
    print(BENCH_NOTE)
    return 0


def _headlines(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    return {task: {metric: values[metric] for metric in ("auc", "rmse", "ne") if metric in values}
            for task, values in results["tasks"].items()}  # fmt: skip


def summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    steps: List[Dict[str, Any]] = []
    for line in (out / "logs" / "steps.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        steps.append({"step": name, "status": "ok" if status == "0" else "skipped" if status == "skipped" else
                      f"failed (exit {status})", "seconds": int(seconds)})  # fmt: skip
    runs: Dict[str, Optional[Dict[str, Any]]] = {}
    for precision, file in (("fp32", "train.json"), ("bf16", "train_bf16.json"), ("fp16", "train_fp16.json")):
        runs[precision] = json.loads((out / file).read_text()) if (out / file).exists() else None
    figures = {
        precision: {"tasks": _headlines(results), "samples_per_s": results["training"]["samples_per_s"],
                    "steps": results["training"]["steps"], "train_seconds": results["training"]["train_seconds"]}
        for precision, results in runs.items() if results is not None
    }  # fmt: skip
    if "fp32" in figures:  # each precision's largest headline difference from fp32
        base = figures["fp32"]["tasks"]
        for precision, values in figures.items():
            values["max_abs_diff_from_fp32"] = max(
                (abs(v - base[t][m]) for t, metrics in values["tasks"].items() for m, v in metrics.items()), default=0.0
            )
    document = {
        "dry_run": args.dry_run == "1",
        "device": args.device,
        "ok": all(step["status"] == "ok" for step in steps),
        "steps": steps,
        "precisions": figures,
    }
    _write(str(out / "summary.json"), document)
    print(json.dumps({"ok": document["ok"], "steps": {s["step"]: s["status"] for s in steps}}, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("env", "summary"):
        command = commands.add_parser(name)
        command.add_argument("--device", required=True)
        command.add_argument("--dry-run", default="0")
        command.add_argument("--out", required=True)
    command = commands.add_parser("predict")
    for option in ("--checkpoint", "--input", "--scores", "--device", "--out"):
        command.add_argument(option, required=True)
    command = commands.add_parser("export-check")
    for option in ("--checkpoint", "--fp32", "--int8", "--device", "--out"):
        command.add_argument(option, required=True)
    command.add_argument("--rows", type=int, default=1000)
    commands.add_parser("bench-note").add_argument("--out", required=True)
    args = parser.parse_args(argv)
    handlers = {"env": env, "predict": predict, "export-check": export_check, "bench-note": bench_note,
                "summary": summary}  # fmt: skip
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
