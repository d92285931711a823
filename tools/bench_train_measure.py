"""What tools/bench_train.py measures besides the contenders' rates (see its docstring): step timing taken in turns,
the MMoE tower's achieved FLOP rate, and row-wise sharding's per-rank memory (in fresh processes of bench_train.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from tqdm import tqdm

from bench_train_contenders import EMBEDDING_DIM, MODEL, NUM_SPARSE, TASKS, build_ours, make_batches, table_sizes
from common import quiet
from torchrec_mtl.build import build_tower
from torchrec_mtl.model import MultiTaskModel
from torchrec_mtl.modules.expert_bank import ExpertBank
from torchrec_mtl.train.distributed import init_distributed
from torchrec_mtl.train.loop import make_pipeline

BENCH_TRAIN = Path(__file__).resolve().with_name("bench_train.py")  # the memory workers are processes of it


def time_steps(steppers: Dict[str, Callable], steps: int, warmup: int, progress: bool = True) -> Dict[str, List[float]]:
    """Seconds of each of ``steps`` timed steps per contender, after ``warmup`` untimed ones. The contenders take
    turns step by step, so that load from other processes on the machine falls on all of them alike."""
    times: Dict[str, List[float]] = {name: [] for name in steppers}
    with tqdm(total=len(steppers) * (warmup + steps), desc="training steps", disable=not progress) as bar:
        for index in range(warmup + steps):
            bar.set_postfix_str("warm-up" if index < warmup else "timed")
            for name, step in steppers.items():
                started = time.perf_counter()
                step()
                if index >= warmup:
                    times[name].append(time.perf_counter() - started)
                bar.update(1)
    return times


def tower_flops(batch_size: int, repeats: int, progress: bool = True) -> Dict[str, Any]:
    """The MMoE tower's forward+backward GFLOP/s against torch.mm's on its largest Linear layer (module docstring).

    The tower step and the three products take turns, ``repeats`` times, so load from other processes falls on both
    alike; medians of each."""
    torch.manual_seed(0)
    in_features = MultiTaskModel.tower_in_features(NUM_SPARSE, EMBEDDING_DIM)
    tower = build_tower(MODEL.tower, in_features, TASKS.tower_tasks)
    layers = linear_shapes(tower)
    forward_flops = sum(2 * batch_size * n_in * n_out for n_in, n_out in layers)
    x = torch.randn(batch_size, in_features, requires_grad=True)

    def tower_step() -> None:
        tower.zero_grad(set_to_none=True)
        x.grad = None
        sum(logit.sum() for logit in tower(x).values()).backward()

    largest_in, largest_out = max(layers, key=lambda shape: shape[0] * shape[1])
    weight = torch.randn(largest_out, largest_in)
    inputs = torch.randn(batch_size, largest_in)
    grads = torch.randn(batch_size, largest_out)
    functions: Dict[str, Callable[[], Any]] = {
        "tower": tower_step,
        # the three products of an nn.Linear's step, with its layouts
        "mm_forward": lambda: torch.mm(inputs, weight.t()),
        "mm_input_grad": lambda: torch.mm(grads, weight),
        "mm_weight_grad": lambda: torch.mm(grads.t(), inputs),
    }
    for function in functions.values():  # warm-up: allocator, BLAS buffers
        function()
        function()
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in tqdm(range(repeats), desc="tower FLOPs", leave=False, disable=not progress):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    layer_flops = 2 * batch_size * largest_in * largest_out

    def rates(seconds: Dict[str, float]) -> Tuple[float, float]:
        """(tower GFLOP/s, the products' GFLOP/s) from one time per function."""
        products = seconds["mm_forward"] + seconds["mm_input_grad"] + seconds["mm_weight_grad"]
        return 3 * forward_flops / seconds["tower"] / 1e9, 3 * layer_flops / products / 1e9

    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    tower_gflops, mm_gflops = rates(medians)
    fast_tower, fast_mm = rates({name: quartile(seconds) for name, seconds in times.items()})
    return {
        "tower_flops_fraction": round(tower_gflops / mm_gflops, 3),
        "tower_gflops_per_s": round(tower_gflops, 2),
        "mm_gflops_per_s": round(mm_gflops, 2),
        "mm_forward_gflops_per_s": round(layer_flops / medians["mm_forward"] / 1e9, 2),
        "tower_gflop_per_step": round(3 * forward_flops / 1e9, 3),
        "tower_largest_linear": [largest_in, largest_out],
        "median_seconds": {name: round(seconds, 6) for name, seconds in medians.items()},
        "tower_flops_fraction_p25": round(fast_tower / fast_mm, 3),
    }


def linear_shapes(tower: nn.Module) -> List[Tuple[int, int]]:
    """(in, out) of each linear layer of ``tower``: every nn.Linear (gates, heads) and each expert's layer of every
    ExpertBank (one nn.Linear each before the banks held them stacked)."""
    shapes = [(m.in_features, m.out_features) for m in tower.modules() if isinstance(m, nn.Linear)]
    for bank in (m for m in tower.modules() if isinstance(m, ExpertBank)):
        shapes += [(weight.shape[1], weight.shape[0]) for weight in bank.expert_weights()]
    return shapes


def quartile(seconds: List[float]) -> float:
    """The 25th percentile of step times: the pace of the steps least disturbed by other processes."""
    return float(np.percentile(seconds, 25))


def local_bytes(value: Any) -> int:
    """Bytes of this rank's local shards of every ShardedTensor in a nested state (dicts, lists)."""
    if isinstance(value, ShardedTensor):
        return sum(shard.tensor.numel() * shard.tensor.element_size() for shard in value.local_shards())
    if isinstance(value, dict):
        return sum(local_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(local_bytes(v) for v in value)
    return 0


def memory_worker(args: argparse.Namespace) -> None:
    """One rank of the memory measurement (launched by ``measure_memory`` with RANK, WORLD_SIZE, MASTER_*): shard
    every table row-wise, take two training steps, and write this rank's embedding bytes and peak memory."""
    quiet()
    env = init_distributed()
    torch.set_num_threads(max(1, args.threads // env.world_size))
    torch.manual_seed(0)
    sizes = table_sizes(args.item_rows, args.quick)
    sharded, optimizer, _ = build_ours(env, sizes, sharding_types=["row_wise"])
    placed = sorted({ps.sharding_type for plan in sharded.plan.plan.values() for ps in plan.values()})
    # a couple of steps, so that whatever the optimizer allocates lazily is there too
    batches = make_batches(sizes, max(1, args.batch_size // env.world_size), 4, seed=1 + env.rank, progress=False)
    pipeline = make_pipeline(sharded, optimizer, env.device)
    iterator = iter(batches)
    for _ in range(2):
        pipeline.progress(iterator)
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "sharding_types": placed,
        "weight_bytes": local_bytes(sharded.state_dict()),
        "optimizer_bytes": local_bytes(sharded.fused_optimizer.state_dict()),
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
    }
    Path(args.memory_worker).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_memory(args: argparse.Namespace, progress: bool = True) -> Dict[str, Any]:
    """Run ``memory_worker`` at world sizes 1 and 2 (fresh processes of this script, at the same time) and compare
    the largest per-rank embedding bytes."""
    passed = ["--item-rows", str(args.item_rows), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    passed += ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as logs:
        launched = []
        for world_size in (1, 2):
            port = free_port()
            for rank in range(world_size):
                out = Path(folder) / f"ws{world_size}_rank{rank}.json"
                env = {
                    **os.environ,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                }
                log = logs.enter_context(open(Path(folder) / f"ws{world_size}_rank{rank}.log", "w"))
                command = [sys.executable, str(BENCH_TRAIN), "--out", str(out), *passed]
                command += ["--memory-worker", str(out)]
                launched.append((out, log, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)))
        with tqdm(total=len(launched), desc="memory (ws 1 and 2)", leave=False, disable=not progress) as bar:
            for out, log, process in launched:
                code = process.wait()
                if code != 0:
                    log.flush()
                    tail = Path(log.name).read_text()[-3000:]
                    raise RuntimeError(f"memory worker {out.name} exited with {code}:\n{tail}")
                bar.update(1)
        ranks = [json.loads(out.read_text()) for out, _, _ in launched]
    for rank in ranks:
        if rank["sharding_types"] != ["row_wise"]:
            raise RuntimeError(f"the plan placed {rank['sharding_types']}, asked for row_wise only")
        rank["embedding_bytes"] = rank["weight_bytes"] + rank["optimizer_bytes"]
    ws1 = [r for r in ranks if r["world_size"] == 1]
    ws2 = [r for r in ranks if r["world_size"] == 2]
    return {
        "row_wise_memory_ratio": round(max(r["embedding_bytes"] for r in ws2) / ws1[0]["embedding_bytes"], 4),
        "embedding_bytes_ws1": ws1[0]["embedding_bytes"],
        "embedding_bytes_ws2_per_rank": [r["embedding_bytes"] for r in ws2],
        "table_weight_bytes_ws2_per_rank": [r["weight_bytes"] for r in ws2],
        "optimizer_state_bytes_ws2_per_rank": [r["optimizer_bytes"] for r in ws2],
        "peak_rss_mb_ws1": round(ws1[0]["maxrss_bytes"] / 2**20, 1),
        "peak_rss_mb_ws2_per_rank": [round(r["maxrss_bytes"] / 2**20, 1) for r in ws2],
    }
