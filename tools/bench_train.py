#!/usr/bin/env python3
"""Training throughput of our sharded path against plain PyTorch loops, side by side in one run; plus row-wise
sharding's per-rank memory and the MMoE tower's achieved FLOP rate.

The model, for every contender: 26 categorical features (one ID per row each) with one table per feature, a
``--item-rows`` item table (default 1,000,000 rows) and 25 more tables from 1,000 to 100,000 rows (geometric
spacing), embedding dim 64; 13 dense features through torchrec's DenseArch [512, 256, 64] (DLRM's Criteo bottom
MLP); torchrec's InteractionArch (pairwise dots), the dense and sparse vectors and the dots concatenated into an
MMoE tower (torchrec_mtl.modules.towers.MMoE: 4 experts [128, 64], heads [32]) with three heads: ``ctr`` and ``cvr``
(binary, BCE) and ``rating`` (regression, squared error), the three losses summed.

Contenders, stepped on the same batches (generated once, up front, from a seeded generator):

- ``ours``: torchrec_mtl.job.build_model -> MultiTaskTrain(MultiTaskObjective) -> shard_model (DistributedModelParallel
  at world size 1: fused FBGEMM TBE with row-wise Adagrad inside backward, Adam for the dense part) ->
  make_pipeline (TrainPipelineSparseDist); one step is one ``pipeline.progress``.
- ``naive``: what torch-rechub and DeepCTR-Torch do: one nn.EmbeddingBag per feature with dense gradients and one
  torch.optim.Adam (default settings) over all parameters.
- ``strong``: the strongest plain loop: nn.EmbeddingBag(sparse=True) per feature, torch.optim.SparseAdam for the
  tables and a fused torch.optim.Adam for the dense part.
- ``naive_fused_adam`` (context, no target): ``naive`` with torch's fused Adam kernel (``fused=True``) instead of
  the default per-tensor loop the peers get; it shows how much of naive's cost is the optimizer's implementation
  rather than the dense updates of every table row.

The dense part (DenseArch, InteractionArch, MMoE) is the same modules in every contender; the script checks that their
parameter counts agree. IDs are drawn from a truncated Zipf law, p(rank k) proportional to (k + 1) ** -1.05 (item
popularity in public logs such as MovieLens or Taobao follows roughly a power law with exponent near 1), and each
table's ranks are scattered over its rows by a fixed random permutation, as hashed IDs would be, so popular rows do
not all sit in one row-wise shard. Each step (forward, backward, optimizer) is timed after warm-up steps; the
contenders take turns step by step, so that load from other processes on the machine falls on all of them alike; the
median step time gives samples/s. ``noise_check`` repeats the ratios from each contender's fastest quarter of steps
(25th percentile): on a machine shared with other processes, far apart medians and quartiles mean the run was
disturbed.

``row_wise_memory_ratio``: per-rank embedding memory at world size 2 over world size 1, both with every table
row-wise sharded (``shard_model(..., sharding_types=["row_wise"])``): the bytes of this rank's local shards of every
ShardedTensor in ``sharded.state_dict()`` (the table weights) plus those in ``sharded.fused_optimizer.state_dict()``
(row-wise Adagrad's state), the largest over ranks; each world size runs in fresh processes of this script (gloo on
a free localhost port), which also report their peak resident memory (getrusage's maxrss, whole process).

``tower_flops_fraction``: the tower's achieved GFLOP/s over what plain matrix products reach on this machine.
Numerator: forward and backward of the MMoE tower alone on a [B, in_features] input that requires grad (as the
embeddings do in the model), median time of repeats; FLOPs counted analytically from its Linear layers, 2 * B * in
* out forward and twice that backward (input and weight gradients); elementwise ops, softmax and the gate mixing are
not counted. Denominator: the same three products for the tower's largest Linear layer (an expert's first layer,
in_features -> 128) as torch.mm alone on tensors of the same shapes and layouts (forward x @ W^T, input gradient
g @ W, weight gradient g^T @ x), their median times summed; the tower step and the products take turns. Prints a
table and writes JSON (``targets`` says which acceptance target this run meets; ``config.load_average_before_after``
shows whether other processes shared the CPUs while the steps were timed).

Example::

    .venv/bin/python tools/bench_train.py --sweep 512,2048,4096 --out runs/bench_train.json
    .venv/bin/python tools/bench_train.py --quick --item-rows 5000 --out /tmp/bench_train.json  # a smoke run
    # on CPUs shared with other processes: OpenMP threads that sleep instead of spinning lose less to the others
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_train.py --out /tmp/bench_train_passive.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.models.dlrm import DenseArch, InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from torchrec_mtl.config import ModelConfig, TowerConfig, TrainingConfig
from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.experiments import quiet
from torchrec_mtl.job import build_model, build_tower
from torchrec_mtl.model import MultiTaskModel, MultiTaskTrain
from torchrec_mtl.tasks import MultiTaskObjective, TaskSet, TaskSpec
from torchrec_mtl.train.distributed import DistributedEnv, init_distributed, shard_model
from torchrec_mtl.train.loop import make_pipeline

EMBEDDING_DIM = 64
NUM_DENSE = 13
NUM_SPARSE = 26
ZIPF_EXPONENT = 1.05
RATING_OFFSET = 3.0  # the regression head starts at a typical rating, as prepare_job's label-mean offset does
EMBEDDING_LR = 0.05  # the configs' defaults (configs/mmoe_synthetic.yaml); rates do not change the step's cost
DENSE_LR = 0.002
MODEL = ModelConfig(
    embedding_dim=EMBEDDING_DIM,
    dense_arch_layer_sizes=[512, 256, EMBEDDING_DIM],
    tower=TowerConfig(kind="mmoe", num_experts=4, expert_layer_sizes=[128, 64], tower_layer_sizes=[32]),
)
TASKS = TaskSet(
    tasks=(
        TaskSpec("ctr", "binary", "click"),
        TaskSpec("cvr", "binary", "conversion"),
        TaskSpec("rating", "regression", "rating"),
    )
)
TARGETS = {  # the acceptance: key -> (bound, "min" or "max")
    "speedup_vs_naive": (5.0, "min"),
    "speedup_vs_strong": (1.0, "min"),
    "row_wise_memory_ratio": (0.55, "max"),
    "tower_flops_fraction": (0.5, "min"),
}
Batch = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]  # dense [B, 13], ids [F, B, 1], labels


# ---------------------------------------------------------------------------------------------------- the data


def table_sizes(item_rows: int, quick: bool) -> Dict[str, int]:
    """Feature -> table rows: the item table, then 25 tables spaced geometrically (1,000 to 100,000 rows; 100 to
    1,000 with ``quick``)."""
    low, high = (100, 1_000) if quick else (1_000, 100_000)
    others = np.geomspace(low, high, NUM_SPARSE - 1).round().astype(int)
    return {"item": item_rows, **{f"c{i:02d}": int(rows) for i, rows in enumerate(others, 1)}}


def zipf_ids(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """``size`` row IDs in [0, rows): popularity rank k drawn with p proportional to (k + 1) ** -ZIPF_EXPONENT, then
    mapped to a row by a fixed random permutation (hashed IDs spread popular items over the table)."""
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right").clip(max=rows - 1)
    return rng.permutation(rows)[ranks]


def make_batches(
    sizes: Dict[str, int], batch_size: int, count: int, seed: int, progress: bool = True
) -> List[MultiTaskBatch]:
    """``count`` training batches of ``batch_size`` rows: one ID per feature, Criteo-like dense counts, random
    labels (throughput does not depend on them)."""
    rng = np.random.default_rng(seed)
    rows = batch_size * count
    ids = np.stack(
        [zipf_ids(rng, n, rows) for n in tqdm(sizes.values(), desc="batches", leave=False, disable=not progress)]
    )  # [F, rows]
    dense = np.log1p(rng.exponential(10.0, size=(rows, NUM_DENSE))).astype(np.float32)
    click = (rng.random(rows) < 0.2).astype(np.float32)
    conversion = click * (rng.random(rows) < 0.2)
    rating = rng.integers(1, 6, size=rows).astype(np.float32)
    lengths = torch.ones(NUM_SPARSE * batch_size, dtype=torch.int32)
    batches = []
    for i in range(count):
        part = slice(i * batch_size, (i + 1) * batch_size)
        batches.append(
            MultiTaskBatch(
                dense_features=torch.from_numpy(dense[part].copy()),
                sparse_features=KeyedJaggedTensor.from_lengths_sync(
                    keys=list(sizes), values=torch.from_numpy(ids[:, part].reshape(-1).copy()), lengths=lengths
                ),
                labels={
                    "click": torch.from_numpy(click[part].copy()),
                    "conversion": torch.from_numpy(conversion[part].astype(np.float32)),
                    "rating": torch.from_numpy(rating[part].copy()),
                },
                row_weight=torch.ones(batch_size),
            )
        )
    return batches


def plain_batch(batch: MultiTaskBatch) -> Batch:
    """The same batch as the plain loops take it: IDs [F, B, 1], each feature's slice contiguous (the KJT's values are
    feature-major with one ID per row), so the plain loops pay no reshaping inside the step."""
    ids = batch.sparse_features.values().view(NUM_SPARSE, -1, 1)
    return batch.dense_features, ids, batch.labels


# ---------------------------------------------------------------------------------------------------- the models


def build_ours(
    env: DistributedEnv, sizes: Dict[str, int], sharding_types: Optional[List[str]] = None
) -> Tuple[nn.Module, torch.optim.Optimizer, MultiTaskModel]:
    """Our full path: build_model (meta) -> MultiTaskTrain -> shard_model; returns (sharded, optimizer, the model
    before sharding, for its parameter count)."""
    model = build_model(MODEL, NUM_DENSE, sizes, task_names=TASKS.tower_tasks)
    objective = MultiTaskObjective(
        TASKS, offsets={"rating": RATING_OFFSET}, weighting="static", gradient_cosine_every=0
    )
    extra = {"sharding_types": sharding_types} if sharding_types else {}
    sharded, optimizer = shard_model(
        model=MultiTaskTrain(model, objective),
        env=env,
        embedding_optimizer="rowwise_adagrad",
        embedding_lr=EMBEDDING_LR,
        dense_lr=DENSE_LR,
        **extra,
    )
    return sharded, optimizer, model


class PlainModel(nn.Module):
    """The plain-PyTorch model: one nn.EmbeddingBag per feature, then the same dense modules as MultiTaskModel."""

    def __init__(self, sizes: Dict[str, int], sparse: bool) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(
            [nn.EmbeddingBag(rows, EMBEDDING_DIM, mode="sum", sparse=sparse) for rows in sizes.values()]
        )
        self.dense_arch = DenseArch(NUM_DENSE, MODEL.dense_arch_layer_sizes)
        self.interaction = InteractionArch(len(sizes))
        in_features = MultiTaskModel.tower_in_features(len(sizes), EMBEDDING_DIM)
        self.tower = build_tower(MODEL.tower, in_features, TASKS.tower_tasks)

    def dense_parameters(self) -> List[nn.Parameter]:
        """Every parameter but the tables'."""
        return [p for name, p in self.named_parameters() if not name.startswith("embeddings.")]

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        embedded = torch.stack([bag(ids[i]) for i, bag in enumerate(self.embeddings)], dim=1)  # [B, F, D]
        interactions = self.interaction(self.dense_arch(dense), embedded)
        return self.tower(torch.cat([interactions, embedded.flatten(1)], dim=1))


def plain_loss(logits: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor]) -> torch.Tensor:
    """BCE per binary task plus the rating's squared error, summed (every row belongs to every task here)."""
    return (
        F.binary_cross_entropy_with_logits(logits["ctr"], labels["click"])
        + F.binary_cross_entropy_with_logits(logits["cvr"], labels["conversion"])
        + F.mse_loss(logits["rating"] + RATING_OFFSET, labels["rating"])
    )


def plain_stepper(model: PlainModel, optimizers: Sequence[torch.optim.Optimizer], batches: List[Batch]) -> Callable:
    """A function running one training step of ``model`` on the next batch of ``batches`` (cycled)."""
    source = itertools.cycle(batches)

    def step() -> None:
        dense, ids, labels = next(source)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        plain_loss(model(dense, ids), labels).backward()
        for optimizer in optimizers:
            optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------------- measuring


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
    linears = [m for m in tower.modules() if isinstance(m, nn.Linear)]
    forward_flops = sum(2 * batch_size * m.in_features * m.out_features for m in linears)
    x = torch.randn(batch_size, in_features, requires_grad=True)

    def tower_step() -> None:
        tower.zero_grad(set_to_none=True)
        x.grad = None
        sum(logit.sum() for logit in tower(x).values()).backward()

    largest = max(linears, key=lambda m: m.in_features * m.out_features)
    weight = torch.randn(largest.out_features, largest.in_features)
    inputs = torch.randn(batch_size, largest.in_features)
    grads = torch.randn(batch_size, largest.out_features)
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
    layer_flops = 2 * batch_size * largest.in_features * largest.out_features

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
        "tower_largest_linear": [largest.in_features, largest.out_features],
        "median_seconds": {name: round(seconds, 6) for name, seconds in medians.items()},
        "tower_flops_fraction_p25": round(fast_tower / fast_mm, 3),
    }


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
                command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), *passed]
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


# ---------------------------------------------------------------------------------------------------- the run


def build_contenders(
    env: DistributedEnv, sizes: Dict[str, int], batches: List[MultiTaskBatch]
) -> Tuple[Dict[str, Callable[[], Any]], int]:
    """One training-step function per contender, each on its own model over ``batches`` (cycled), and the dense
    parameter count they share (checked: the contenders must run the same dense compute)."""
    torch.manual_seed(0)
    sharded, optimizer, model = build_ours(env, sizes)
    pipeline = make_pipeline(sharded, optimizer, env.device)
    sharded.train()
    ours_source = itertools.cycle(batches)
    plain_batches = [plain_batch(batch) for batch in batches]
    naive = PlainModel(sizes, sparse=False)
    naive_fused = PlainModel(sizes, sparse=False)
    strong = PlainModel(sizes, sparse=True)
    ours_dense = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("sparse_arch."))
    plain_dense = sum(p.numel() for p in naive.dense_parameters())
    if ours_dense != plain_dense:
        raise RuntimeError(f"dense parts differ: ours {ours_dense:,} parameters, the plain model {plain_dense:,}")
    steppers = {
        "ours": lambda: pipeline.progress(ours_source),
        "naive": plain_stepper(naive, [torch.optim.Adam(naive.parameters(), lr=DENSE_LR)], plain_batches),
        # context, not a target: the naive loop with torch's fused Adam kernel (not the default the peers use)
        "naive_fused_adam": plain_stepper(
            naive_fused, [torch.optim.Adam(naive_fused.parameters(), lr=DENSE_LR, fused=True)], plain_batches
        ),
        "strong": plain_stepper(
            strong,
            [
                torch.optim.SparseAdam(list(strong.embeddings.parameters()), lr=DENSE_LR),
                torch.optim.Adam(strong.dense_parameters(), lr=DENSE_LR, fused=True),
            ],
            plain_batches,
        ),
    }
    return steppers, ours_dense


def batch_sweep(
    env: DistributedEnv, sizes: Dict[str, int], batch_sizes: List[int], args: argparse.Namespace, progress: bool
) -> List[Dict[str, Any]]:
    """Ours over naive and over strong at other batch sizes: the naive loop's dense Adam over every table row costs
    the same per step whatever the batch, so its gap to ours narrows as batches grow."""
    rows = []
    for batch_size in batch_sizes:
        batches = make_batches(sizes, batch_size, args.warmup + args.steps + 2, seed=0, progress=False)
        steppers, _ = build_contenders(env, sizes, batches)
        steppers.pop("naive_fused_adam")
        medians = {n: statistics.median(t) for n, t in time_steps(steppers, args.steps, args.warmup, progress).items()}
        del steppers
        rows.append(
            {
                "batch_size": batch_size,
                **{f"{name}_samples_per_s": round(batch_size / m, 1) for name, m in medians.items()},
                "speedup_vs_naive": round(medians["naive"] / medians["ours"], 3),
                "speedup_vs_strong": round(medians["strong"] / medians["ours"], 3),
            }
        )
    return rows


def target_report(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each acceptance target with its bound and whether this run meets it."""
    report = {}
    for key, (bound, kind) in TARGETS.items():
        value = result[key]
        report[key] = {"value": value, kind: bound, "met": value >= bound if kind == "min" else value <= bound}
    return report


def summary_table(result: Dict[str, Any]) -> str:
    """The printed summary: each contender's rate, the noise check and the targets."""
    lines = [f"{'contender':<18}{'samples/s':>12}{'median step ms':>16}{'ours over it':>14}"]
    for name in result["median_step_seconds"]:
        rate = result[f"{name}_samples_per_s"]
        ratio = result["ours_samples_per_s"] / rate
        lines.append(f"{name:<18}{rate:>12,.0f}{1000 * result['median_step_seconds'][name]:>16.1f}{ratio:>13.2f}x")
    noise = result["noise_check"]
    lines.append(
        f"(fastest quarter of steps: ours over naive {noise['speedup_vs_naive_p25']:.2f}x, over strong "
        f"{noise['speedup_vs_strong_p25']:.2f}x; tower fraction {noise['tower_flops_fraction_p25']:.3f})\n"
    )
    for key, target in result["targets"].items():
        bound = f">= {target['min']}" if "min" in target else f"<= {target['max']}"
        lines.append(f"{key:<24}{target['value']:>10.3f}  target {bound:<8} {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per step (default: the job's training.batch_size, 1024; 256 with --quick)"
    )
    parser.add_argument(
        "--sweep", default="", help="comma-separated batch sizes at which to time the contenders again (e.g. 512,2048)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 20; 3 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per contender first (default 3; 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--item-rows", type=int, default=1_000_000, help="rows of the item table")
    parser.add_argument("--quick", action="store_true", help="small tables and few steps: a smoke run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: one rank of measure_memory
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_size = args.batch_size or (256 if quick else TrainingConfig().batch_size)
    args.steps = args.steps or (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    if args.memory_worker:
        memory_worker(args)
        return 0
    quiet()
    progress = not args.no_progress
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    # first, while this process holds no model: the memory workers then do not compete with timed steps
    memory = measure_memory(args, progress)

    env = init_distributed()
    sizes = table_sizes(args.item_rows, quick)
    # the pipeline runs up to two batches ahead of the one it trains on
    count = args.warmup + args.steps + 2
    batches = make_batches(sizes, args.batch_size, count, seed=0, progress=progress)

    steppers, dense_parameters = build_contenders(env, sizes, batches)
    load_before = os.getloadavg()
    times = time_steps(steppers, args.steps, args.warmup, progress)
    load_after = os.getloadavg()
    del steppers  # and with them the models: the tables' memory is free again before the tower timing
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    rates = {name: args.batch_size / seconds for name, seconds in medians.items()}
    flops = tower_flops(args.batch_size, repeats=3 if quick else 15, progress=progress)

    unique_items = [int(batch.sparse_features["item"].values().unique().numel()) for batch in batches]
    result: Dict[str, Any] = {
        **{f"{name}_samples_per_s": round(rate, 1) for name, rate in rates.items()},
        "speedup_vs_naive": round(rates["ours"] / rates["naive"], 3),
        "speedup_vs_strong": round(rates["ours"] / rates["strong"], 3),
        "speedup_vs_naive_fused_adam": round(rates["ours"] / rates["naive_fused_adam"], 3),
        "row_wise_memory_ratio": memory["row_wise_memory_ratio"],
        "tower_flops_fraction": flops["tower_flops_fraction"],
        "median_step_seconds": {name: round(s, 5) for name, s in medians.items()},
        "noise_check": {
            "p25_samples_per_s": {name: round(args.batch_size / quartile(s), 1) for name, s in times.items()},
            **{
                f"speedup_vs_{name}_p25": round(quartile(times[name]) / quartile(times["ours"]), 3)
                for name in ("naive", "strong", "naive_fused_adam")
            },
            "tower_flops_fraction_p25": flops["tower_flops_fraction_p25"],
        },
        "memory": memory,
        "tower": flops,
        "config": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "quick": quick,
            "table_sizes": sizes,
            "embedding_rows": sum(sizes.values()),
            "embedding_dim": EMBEDDING_DIM,
            "num_dense": NUM_DENSE,
            "dense_arch_layer_sizes": MODEL.dense_arch_layer_sizes,
            "tower": {
                "kind": MODEL.tower.kind,
                "num_experts": MODEL.tower.num_experts,
                "expert_layer_sizes": MODEL.tower.expert_layer_sizes,
                "tower_layer_sizes": MODEL.tower.tower_layer_sizes,
                "in_features": MultiTaskModel.tower_in_features(NUM_SPARSE, EMBEDDING_DIM),
            },
            "tasks": TASKS.names,
            "dense_parameters": dense_parameters,
            "zipf_exponent": ZIPF_EXPONENT,
            "unique_item_ids_per_batch_median": statistics.median(unique_items),
            "torch": torch.__version__,
            "torchrec": _version("torchrec"),
            "fbgemm_gpu": _version("fbgemm_gpu"),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            # 1-minute load averages around the timed steps: above the thread count, other processes shared the CPUs
            "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            # GNU OpenMP's threads spin between parallel regions unless this is PASSIVE; on CPUs shared with other
            # processes spinning threads lose their turns, which slows every contender (read at torch's import)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        },
        "step_seconds": {name: [round(s, 5) for s in seconds] for name, seconds in times.items()},
    }
    if args.sweep:
        result["sweep"] = batch_sweep(env, sizes, [int(b) for b in args.sweep.split(",")], args, progress)
    result["targets"] = target_report(result)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary_table(result))
    for row in result.get("sweep", []):
        print(f"batch {row['batch_size']:>5}: ours over naive {row['speedup_vs_naive']:.2f}x, over strong "
              f"{row['speedup_vs_strong']:.2f}x")  # fmt: skip
    print(
        f"batch {args.batch_size}, {args.steps} timed steps each, {args.threads} threads; "
        f"ws2 per-rank embedding bytes {memory['embedding_bytes_ws2_per_rank']} over ws1 "
        f"{memory['embedding_bytes_ws1']}; tower {flops['tower_gflops_per_s']} GFLOP/s, "
        f"mm {flops['mm_gflops_per_s']} GFLOP/s\n-> {args.out}"
    )
    return 0


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except (ImportError, AttributeError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
