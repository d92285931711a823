#!/usr/bin/env python3
"""Training speed and memory of our trainer against the real peers' (DeepCTR-Torch, torch-rechub), each in its own
process, interleaved in one run: samples/s, peak RSS, test AUC, and the ratios, as JSON.

The workload (tools/bench_peers_workload.py): one generated log of ``--rows`` rows (default 1M; a fifth for test)
with two binary labels (click; conversion on clicked rows, with signal), 13 counts and 26 categorical columns, read
at two sets of table sizes:

- the peers' workload: a 200,000-row item table, a 100,000-row user table and 24 smaller ones, embedding dim 16,
  batch 2,048, MMoE with 4 experts [256, 128] and task towers [64], 2 threads;
- Criteo-sized tables (``scale``): the 26 Criteo Kaggle cardinalities, 33.8M rows in all, same model; each
  contender gets ``--time-limit`` seconds and its samples/s counts what it finished.

Ours preprocesses the log into shards (before any timing); the peers read the same rows, vocabulary-mapped, from
our shards (``rows.npz``), with the same train/test split.

Contenders, each run in a fresh process (``ru_maxrss`` would mix processes; a child reports its own VmHWM):

- ``trainer``: the whole user-facing training path. Ours: ``run_job`` (what ``torchrec-mtl train`` runs) on our
  config over the log (tools/bench_peers_ours.py), with ``model.interaction.kind=--interaction`` (default
  ``concat``: the embeddings and the dense vector side by side, the width of the peers' MMoE input; our default
  ``dot`` adds DLRM's pairwise dots and is run too, as ``ours_dot``) and our default diagnostics (curve metrics,
  gates, gradient cosines); ``ours_no_diagnostics`` is the same with them off; ``ours_peers_recipe`` trains at the
  peers' input width, optimizer and loss (tools/bench_peers_workload.PEERS_RECIPE), like with like. DeepCTR-Torch:
  ``model.fit``;
  torch-rechub: ``MTLTrainer.train_one_epoch`` (tools/bench_peers_runner.py, in the peers' venv). One pass over the
  training rows, then each trainer's test AUCs (CTR; CVR on clicked rows; CTCVR = pCTR x pCVR).
- ``step``: forward, backward and optimizer step on batches held in memory. Ours: the sharded model through
  TrainPipelineSparseDist (as tools/bench_train_contenders.py steps it); the peers: their MMoE module in a plain
  loop with their own loss and optimizer. The median step gives samples/s.

Every round runs each contender once, in turns (the order reversed every other round), so that load from other
processes on the machine falls on all of them alike; the JSON has each round's figures and their medians.

``trainer_over_fastest_peer``, ``step_over_fastest_peer``, ``scale_over_fastest_peer`` (trainers at Criteo-sized
tables) and ``scale_step_over_fastest_peer``: our median samples/s over the fastest peer's;
``peers_recipe_over_fastest_peer``: the same of ``ours_peers_recipe``'s trainer. ``diagnostics_cost``: the
share of our training time that the default diagnostics take, measured by tools/bench_diagnostics.py (two training
loops at this batch size in lock step, one with the diagnostics and one without; ``diagnostics_lock_step`` has its
figures); ``diagnostics_cost_trainers`` is the same from the whole trainers in turns, 1 - (samples/s with them) /
(without), which the machine's changing load moves more. Round r trains every contender from seed ``--seed`` + r - 1
(the log and split stay), so ``test_auc`` is a mean over seeds and ``test_auc_std`` their spread.

The peers are installed into their own venv (``--venv``, default runs/peers/venv, made from
tools/peers-requirements.txt by tools/compare_peers.py's ensure_peer_venv; never .venv). A benchmark run by hand;
tests/test_bench_peers.py runs ``--smoke``.

Example::

    nice -n 10 .venv/bin/python tools/bench_peers.py --out runs/bench_peers.json
    # on CPUs shared with other processes: OpenMP threads that sleep instead of spinning lose less to the others
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_peers.py --out runs/bench_peers.json
    .venv/bin/python tools/bench_peers.py --skip-scale --rounds 1 --out /tmp/bench_peers.json
    .venv/bin/python tools/bench_peers.py --smoke --no-peers --out /tmp/bench_peers_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import bench_peers_workload as workload

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
PEERS = ("deepctr_torch", "torch_rechub")
GIB = float(1 << 30)
# figure group -> the JSON key of ours over the fastest peer in it
RATIOS = {"trainer": "trainer_over_fastest_peer", "step": "step_over_fastest_peer",
          "scale_trainer": "scale_over_fastest_peer", "scale_step": "scale_step_over_fastest_peer"}  # fmt: skip
# seconds a child may take beyond its training limit (imports, building the model, the test rows) before it is killed
GRACE_S = 600.0


@dataclass
class Contender:
    """One timed child process: ``name`` (ours, ours_dot, ours_no_diagnostics, ours_peers_recipe, deepctr_torch,
    torch_rechub), ``mode``
    (trainer or step), ``part`` (workload or scale) and the command that runs it."""

    name: str
    mode: str
    part: str
    command: List[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The figure group: trainer, step, scale_trainer, scale_step."""
        return self.mode if self.part == "workload" else f"scale_{self.mode}"


# ---------------------------------------------------------------------------------------------------- the plan


def ours_variants(interaction: str) -> Dict[str, List[str]]:
    """Our trainer contenders -> their config overrides: ``ours`` at ``interaction`` with the default diagnostics,
    the same without them, at our default interaction (dot) when that is another, and at the peers' recipe
    (``PEERS_RECIPE``: their input width, optimizer and loss)."""
    variants = {"ours": [f"model.interaction.kind={interaction}"]}
    variants["ours_no_diagnostics"] = [*variants["ours"], *workload.DIAGNOSTICS_OFF]
    if interaction != "dot":
        variants["ours_dot"] = ["model.interaction.kind=dot"]
    variants["ours_peers_recipe"] = list(workload.PEERS_RECIPE)
    return variants


def parts(args: argparse.Namespace) -> List[str]:
    """The parts this run measures: the peers' workload and the Criteo-sized tables, unless skipped."""
    return [p for p, skip in (("workload", args.skip_workload), ("scale", args.skip_scale)) if not skip]


def plan(args: argparse.Namespace, files: Dict[str, Path], peers_python: Optional[Path]) -> List[Contender]:
    """Every contender of one round, in order (module docstring)."""
    out: List[Contender] = []
    for part in parts(args):
        limit = args.workload_limit if part == "workload" else args.time_limit
        config = files[f"config_{part}"]
        variants = ours_variants(args.interaction)
        if part == "scale":  # the peers-width trainer alone: each contender costs the time limit there
            variants = {"ours": variants["ours"]}
        for mode in ("trainer", "step"):
            names = variants if mode == "trainer" else {"ours": variants["ours"]}
            for name, overrides in names.items():
                command = [sys.executable, str(TOOLS / "bench_peers_ours.py"), "--mode", mode, "--config", str(config),
                           "--name", name, "--limit", str(limit), "--threads", str(args.threads),
                           "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
                out.append(Contender(name, mode, part, command + [f"--override={o}" for o in overrides]))
            for peer in PEERS if peers_python is not None else ():
                command = [str(peers_python), str(TOOLS / "bench_peers_runner.py"), "--peer", peer, "--mode", mode,
                           "--rows", str(files[f"export_{part}"]), "--limit", str(limit), "--threads",
                           str(args.threads), "--seed", str(args.seed), "--warmup", str(args.warmup),
                           "--steps", str(args.steps)]  # fmt: skip
                out.append(Contender(peer, mode, part, command))
    return out


# ---------------------------------------------------------------------------------------------------- running


def vm_hwm(pid: int) -> Optional[int]:
    """A live process's resident high-water mark in bytes (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_child(contender: Contender, folder: Path, limit_s: float, threads: int) -> Dict[str, Any]:
    """Run one contender's process; its result dict (``error`` set when it failed or was killed at ``limit_s`` +
    GRACE_S), with the load average around it."""
    folder.mkdir(parents=True, exist_ok=True)
    result, log = folder / "result.json", folder / "child.log"
    result.unlink(missing_ok=True)
    command = [*contender.command, "--result", str(result)]
    if contender.name.startswith("ours") and contender.mode == "trainer":
        shutil.rmtree(folder / "run", ignore_errors=True)  # a fresh run folder: no checkpoint to resume from
        command.append(f"--override=out_dir={folder / 'run'}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TOOLS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            code = process.wait(timeout=limit_s + GRACE_S)
        except subprocess.TimeoutExpired:
            rss = vm_hwm(process.pid)
            process.kill()
            process.wait()
            code, record = None, {"error": f"killed after {limit_s + GRACE_S:.0f} s", "peak_rss_bytes": rss}
    if code is not None:
        if code == 0 and result.exists():
            record = json.loads(result.read_text())
        else:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            record = {"error": f"exit code {code}", "log_tail": tail}
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)  # a stopped run's checkpoint: gigabytes
    record.update(contender=contender.name, mode=contender.mode, part=contender.part,
                  process_seconds=round(time.perf_counter() - started, 1),
                  load_average_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)])  # fmt: skip
    return record


def measure_diagnostics(args: argparse.Namespace, work: Path) -> Optional[Dict[str, Any]]:
    """tools/bench_diagnostics.py in a process of its own (it opens a process group) at this run's batch size and
    item table: the default diagnostics against none, two training loops in lock step, which a machine's changing
    load moves far less than whole runs in turns. Its result dict, or None when it failed (said)."""
    out = work / "diagnostics.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(TOOLS / "bench_diagnostics.py"), "--out", str(out), "--no-progress",
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--repetitions", str(args.diagnostics_repetitions)]  # fmt: skip
    if args.smoke:
        command += ["--steps", "40", "--warmup-steps", "10", "--item-rows", "2000"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join([str(ROOT), str(TOOLS)])}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        print(f"diagnostics cost: bench_diagnostics failed ({done.returncode}): {done.stderr[-400:]}", flush=True)
        return None
    return json.loads(out.read_text())


def warm_up(contenders: List[Contender], args: argparse.Namespace, work: Path) -> None:
    """A few untimed steps of each bare-step contender first: the first process to train after a while pays for
    paging in its libraries' code and the data (in a smoke run the first trainer was 5x slower than the same run
    right after it), which would otherwise fall on whichever contender goes first."""
    for contender in contenders:
        if contender.mode == "step":
            command = [*contender.command, "--warmup", "1", "--steps", "2"]  # the last value of an option wins
            folder = work / "children" / f"warm_up_{contender.key}_{contender.name}"
            record = run_child(Contender(contender.name, "step", contender.part, command), folder, 0.0, args.threads)
            if "error" in record:
                print(f"warm-up {contender.key} {contender.name}: {record['error']}", flush=True)


def seeded(contender: Contender, seed: int) -> Contender:
    """The contender trained from ``seed`` (initialisation and shuffling; the log and its split stay the same), so
    that the rounds' test AUCs show each trainer's spread across seeds."""
    if contender.name.startswith("ours"):
        extra = [f"--override=training.seed={seed}"] if contender.mode == "trainer" else []
    else:
        extra = ["--seed", str(seed)]  # the last value of an option wins
    return Contender(contender.name, contender.mode, contender.part, [*contender.command, *extra])


def run_rounds(contenders: List[Contender], args: argparse.Namespace, work: Path) -> List[Dict[str, Any]]:
    """Every contender once per round, in turns (reversed every other round), after an untimed warm-up; each
    finished run's record."""
    warm_up(contenders, args, work)
    records = []
    for index in range(args.rounds):
        order = contenders if index % 2 == 0 else contenders[::-1]
        for contender in order:
            limit = args.workload_limit if contender.part == "workload" else args.time_limit
            folder = work / "children" / f"{contender.key}_{contender.name}_r{index}"
            record = run_child(seeded(contender, args.seed + index), folder, limit, args.threads)
            record["round"] = index
            records.append(record)
            rate = record.get("samples_per_s")
            shown = f"{rate:,.0f} samples/s" if rate else record.get("error", "no figure")
            done = "" if record.get("finished", True) else f" (stopped at the limit, {record.get('samples', 0):,} rows)"
            print(f"round {index + 1}/{args.rounds} {contender.key:<13} {contender.name:<20} {shown}{done}", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------- the figures


def medians(records: List[Dict[str, Any]], figure: str) -> Dict[str, Dict[str, float]]:
    """key (trainer, step, scale_trainer, scale_step) -> contender -> the median of ``figure`` over its rounds."""
    grouped: Dict[str, Dict[str, List[float]]] = {}
    for record in records:
        value = record.get(figure)
        if value is None or "error" in record:
            continue
        key = record["mode"] if record["part"] == "workload" else f"scale_{record['mode']}"
        grouped.setdefault(key, {}).setdefault(record["contender"], []).append(value)
    return {key: {name: statistics.median(values) for name, values in by.items()} for key, by in grouped.items()}


def over_fastest_peer(rates: Dict[str, float], ours: str = "ours") -> Optional[Dict[str, Any]]:
    """Our contender ``ours`` over the fastest peer by samples/s: {ratio, peer}; None without it or a peer figure.

    Example::

        >>> over_fastest_peer({"ours": 300.0, "deepctr_torch": 100.0, "torch_rechub": 150.0})
        {'ratio': 2.0, 'peer': 'torch_rechub'}
    """
    peers = {name: rate for name, rate in rates.items() if name in PEERS and rate}
    if ours not in rates or not peers:
        return None
    peer = max(peers, key=peers.get)
    return {"ratio": round(rates[ours] / peers[peer], 3), "peer": peer}


def diagnostics_cost(trainer_rates: Dict[str, float]) -> Optional[float]:
    """The share of our trainer's training time the default diagnostics take, from whole runs in turns: 1 - rate
    with / rate without (``diagnostics_cost_trainers``; the headline figure is ``measure_diagnostics``').

    Example::

        >>> diagnostics_cost({"ours": 900.0, "ours_no_diagnostics": 1000.0})
        0.1
    """
    on, off = trainer_rates.get("ours"), trainer_rates.get("ours_no_diagnostics")
    return round(1.0 - on / off, 4) if on and off else None


def test_aucs(records: List[Dict[str, Any]], spread: bool = False) -> Dict[str, Dict[str, float]]:
    """Contender -> each task's test AUC, the mean over the rounds that finished (the trainers at the workload; each
    round trains from its own seed); ``spread``: their sample standard deviation instead (0 with one round)."""
    grouped: Dict[str, List[Dict[str, float]]] = {}
    for record in records:
        if record["part"] == "workload" and record.get("test_auc"):
            grouped.setdefault(record["contender"], []).append(record["test_auc"])

    def figure(values: List[float]) -> float:
        if not spread:
            return round(statistics.fmean(values), 4)
        return round(statistics.stdev(values), 4) if len(values) > 1 else 0.0

    return {name: {task: figure([run[task] for run in runs]) for task in runs[0]} for name, runs in grouped.items()}


def per_round_ratios(records: List[Dict[str, Any]], key: str) -> List[Optional[float]]:
    """Ours over the fastest peer within each round (the contenders of a round ran side by side): a noise check."""
    out = []
    for index in sorted({r["round"] for r in records}):
        in_round = [r for r in records if r["round"] == index]
        ratio = over_fastest_peer(medians(in_round, "samples_per_s").get(key, {}))
        out.append(ratio["ratio"] if ratio else None)
    return out


def summarise(records: List[Dict[str, Any]], peers_skipped: Optional[str]) -> Dict[str, Any]:
    """The JSON's figures: medians per contender, the ratios, the AUCs."""
    rates, rss = medians(records, "samples_per_s"), medians(records, "peak_rss_bytes")
    result: Dict[str, Any] = {}
    fastest: Dict[str, Optional[str]] = {}
    for key, name in RATIOS.items():
        ratio = over_fastest_peer(rates.get(key, {}))
        result[name] = ratio["ratio"] if ratio else None
        fastest[key] = ratio["peer"] if ratio else None
    recipe = over_fastest_peer(rates.get("trainer", {}), "ours_peers_recipe")
    result["peers_recipe_over_fastest_peer"] = recipe["ratio"] if recipe else None
    # the lock-step measurement (measure_diagnostics) replaces this when it ran: whole runs in turns vary more
    result["diagnostics_cost"] = diagnostics_cost(rates.get("trainer", {}))
    result["diagnostics_cost_trainers"] = result["diagnostics_cost"]
    result["fastest_peer"] = fastest
    result["samples_per_s"] = rates
    result["peak_rss_gib"] = {k: {n: round(b / GIB, 3) for n, b in by.items()} for k, by in rss.items()}
    result["peak_rss_bytes"] = rss
    result["test_auc"] = test_aucs(records)
    result["test_auc_std"] = test_aucs(records, spread=True)
    result["per_round_over_fastest_peer"] = {key: per_round_ratios(records, key) for key in rates}
    result["peers_skipped"] = peers_skipped
    return result


def format_table(summary: Dict[str, Any]) -> str:
    """Markdown: per contender its samples/s and peak RSS per group, and its test AUCs; then the ratios."""
    rates, rss, aucs = summary["samples_per_s"], summary["peak_rss_gib"], summary["test_auc"]
    names = list(dict.fromkeys(n for by in rates.values() for n in by))
    keys = [k for k in ("trainer", "step", "scale_trainer", "scale_step") if k in rates]
    head = " | ".join(f"{k} samples/s | {k} GiB" for k in keys)
    lines = [f"| contender | {head} | test AUC CTR / CVR / CTCVR |", "|---" * (2 + 2 * len(keys)) + "|"]
    for name in names:
        cells = []
        for key in keys:
            rate, gib = rates[key].get(name), rss.get(key, {}).get(name)
            cells += [f"{rate:,.0f}" if rate else "", f"{gib:.2f}" if gib else ""]
        auc, spread = aucs.get(name), summary.get("test_auc_std", {}).get(name, {})
        auc_text = " / ".join(f"{auc[t]:.4f} ± {spread.get(t, 0.0):.4f}" for t in ("ctr", "cvr", "ctcvr")) if auc else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {auc_text} |")
    ratios = ", ".join(f"{k} {summary[k]}" for k in (*RATIOS.values(), "peers_recipe_over_fastest_peer",
                                                         "diagnostics_cost"))  # fmt: skip
    skipped = f"\npeers skipped: {summary['peers_skipped']}" if summary["peers_skipped"] else ""
    return "\n".join(lines) + f"\n\n{ratios}{skipped}"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="JSON file for the figures")
    parser.add_argument("--rows", type=int, default=None, help="rows of the generated log (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every contender (default 3)")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="seconds of training per contender at Criteo-sized tables")  # fmt: skip
    parser.add_argument("--workload-limit", type=float, default=1800.0,
                        help="seconds of training per contender at the peers' workload (a safety net)")  # fmt: skip
    parser.add_argument("--skip-scale", action="store_true", help="leave out the Criteo-sized tables")
    parser.add_argument("--skip-workload", action="store_true", help="only the Criteo-sized tables")
    parser.add_argument("--interaction", default="concat", choices=("concat", "dot", "dcn"),
                        help="our trainer's model.interaction.kind (concat: the peers' MMoE input width)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 2,048)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every contender")
    parser.add_argument("--warmup", type=int, default=None, help="untimed bare steps first (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed bare steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="the log's seed and round 1's (round r trains from seed + r - 1)")
    parser.add_argument("--diagnostics-repetitions", type=int, default=2,
                        help="repetitions of the lock-step diagnostics measurement (0: only the trainers' figure)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_peers", help="the log, shards, runs")
    parser.add_argument("--venv", type=Path, default=ROOT / "runs" / "peers" / "venv",
                        help="the peers' venv (made from tools/peers-requirements.txt unless it has them)")  # fmt: skip
    parser.add_argument("--torch-index", default=None, help="an extra pip index for the CPU torch wheel")
    parser.add_argument("--no-peers", action="store_true", help="ours only (no peers' venv)")
    parser.add_argument("--smoke", action="store_true",
                        help="a smoke run: 20,000 rows, tables a hundredth, batch 512, 1 round, few steps")  # fmt: skip
    args = parser.parse_args(argv)
    if args.skip_scale and args.skip_workload:
        parser.error("--skip-scale and --skip-workload leave nothing to measure")
    smoke = args.smoke
    args.rows = args.rows or (20_000 if smoke else 1_000_000)
    args.rounds = args.rounds or (1 if smoke else 3)
    args.batch_size = args.batch_size or (512 if smoke else 2048)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.steps = args.steps or (3 if smoke else 20)
    args.divide = 100 if smoke else 1
    return args


def prepare(args: argparse.Namespace) -> Dict[str, Path]:
    """The log, its schemas, our two configs, the shards and the peers' exported rows (each reused when made with
    the same parameters)."""
    work = args.work.resolve()
    paths = workload.ensure_workload(work / "workload", args.rows, args.seed, args.divide)
    files: Dict[str, Path] = {}
    step_rows = (args.warmup + args.steps + 2) * args.batch_size
    for part in parts(args):
        schema = "peers" if part == "workload" else "criteo"
        raw = workload.ours_raw_config(paths, schema, work, args.interaction, args.batch_size, args.seed)
        files[f"config_{part}"] = work / f"config_{part}.json"
        files[f"config_{part}"].write_text(json.dumps(raw, indent=1))
        files[f"export_{part}"] = work / f"export_{part}"
        workload.export_rows(raw, files[f"export_{part}"], step_rows)
    return files


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(TOOLS))
    from common import quiet

    quiet()
    started = time.perf_counter()
    peers_python, peers_skipped = None, None
    if args.no_peers:
        peers_skipped = "--no-peers: ours only"
    else:
        from compare_peers import ensure_peer_venv

        peers_python = ensure_peer_venv(args.venv, args.torch_index)
    print(f"writing the workload ({args.rows:,} rows) and preprocessing it ...", flush=True)
    files = prepare(args)
    records = run_rounds(plan(args, files, peers_python), args, args.work.resolve())
    summary = summarise(records, peers_skipped)
    if args.diagnostics_repetitions > 0:
        print("the default diagnostics' cost, two training loops in lock step ...", flush=True)
        lock_step = measure_diagnostics(args, args.work.resolve())
        if lock_step is not None:
            summary["diagnostics_cost"] = lock_step["diagnostics_cost"]
            summary["diagnostics_lock_step"] = lock_step
    metas = {part: files[f"export_{part}"] / "meta.json" for part in parts(args)}
    summary["config"] = {
        "rows": args.rows, "rounds": args.rounds, "smoke": args.smoke, "batch_size": args.batch_size,
        "threads": args.threads, "interaction": args.interaction, "default_interaction": "dot",
        "diagnostics_off": workload.DIAGNOSTICS_OFF, "time_limit_s": args.time_limit,
        "workload_limit_s": args.workload_limit, "warmup": args.warmup, "steps": args.steps, "seed": args.seed,
        **{f"{part}_export": json.loads(path.read_text()) for part, path in metas.items()},
        **{f"{part}_table_rows": workload.table_rows(path) for part, path in metas.items()},
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(),
        # GNU OpenMP's threads spin between parallel regions unless this is PASSIVE (every child inherits it); on
        # CPUs shared with other processes spinning threads lose their turns and every contender slows
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }  # fmt: skip
    summary["runs"] = records
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"-> {args.out}")
    failed = [f"{r['part']} {r['mode']} {r['contender']}: {r['error']}" for r in records if "error" in r]
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
