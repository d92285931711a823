"""Process groups, sharding and optimizers: the model under DistributedModelParallel.

One process (world size 1, gloo on CPU) needs no launcher; many processes come from torchrun, which sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Tables are placed by torchrec's planner, optionally restricted to some
sharding types; embeddings train with a fused optimizer inside backward, dense parameters with a torchrec keyed
optimizer, and both are combined into the one optimizer the pipelines step.

Example::

    >>> env = init_distributed()  # doctest: +SKIP
    >>> dmp, optimizer = shard_model(train_model, env, "rowwise_adagrad", embedding_lr=0.05)  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed import embeddingbag
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_mtl.device import DeviceError
from torchrec_mtl.train.optimizers import (
    EMBEDDING_OPTIMIZERS,
    FUSED_ON_CPU,
    apply_embedding_optimizers,
    dense_optimizer,
    table_optimizers,
)

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")
# On one process there are no rows to spread over ranks: every table goes table-wise unless the config says otherwise.
# The planner's own choice there (row-wise for the larger tables) adds a bucketize and a reduce-scatter per step and
# splits the tables into two kernel groups (tools/bench_placement.py times each placement).
ONE_PROCESS_SHARDING = ("table_wise",)
ONE_PROCESS_WHY = " (one process: table-wise, nothing to split across ranks)"
DATA_PARALLEL = "data_parallel"
# FBGEMM's CPU kernels have no Adam; a data-parallel table is a replicated parameter that torch's optimizer steps
DATA_PARALLEL_WHY = "Adam on CPU: whole tables on every rank, stepped by torch's fused Adam"
# the kernels that train inside backward on CPU and GPU ("dense": data-parallel tables, which train with their own
# optimizer after backward)
COMPUTE_KERNELS = ("fused", "dense", "fused_uvm", "fused_uvm_caching")


@dataclass(frozen=True)
class TableOptions:
    """Per-table choices: the planner's allowed sharding types and compute kernels, the fused optimizer and its
    learning rate (None: the defaults of ``shard_model``)."""

    sharding_types: Optional[Sequence[str]] = None
    compute_kernels: Optional[Sequence[str]] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None


class EmbeddingBagCollectionSharder(embeddingbag.EmbeddingBagCollectionSharder):
    """torchrec's sharder, with row-wise placements also offered on CPU.

    torchrec 1.9.2 lists row-wise and table-row-wise only for CUDA devices, although its CPU kernels and the gloo
    collectives they use run them (tests/test_distributed.py checks predictions against the unsharded model).
    """

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    backend: Optional[str] = None, timeout_s: float = 600.0, device: Optional[torch.device] = None
) -> DistributedEnv:
    """Join (or create, at world size 1) the default process group: gloo on CPU, NCCL on GPUs.

    Under torchrun the environment names the group; alone, a one-process group on an in-memory store opens no port.
    A collective that waits ``timeout_s`` seconds for a peer (one that hangs) raises instead of waiting for ever; a
    peer that dies breaks the connection and the next collective raises at once.

    ``device`` (default: a GPU when CUDA is present, else the host) decides the backend: NCCL for ``cuda`` (each
    process on the GPU of its LOCAL_RANK; ``cuda:N`` names the GPU of a one-process run), gloo for ``cpu``; a group
    already open with the other backend is a DeviceError.
    """
    if device is not None:
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(
                backend=backend,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        # torn down before the interpreter's own teardown: gloo's worker threads destroyed there abort the process
        # (SIGABRT, "terminate called without an active exception") after its work is done
        atexit.register(_leave_process_group)
    elif backend is not None and dist.get_backend() != backend:
        raise DeviceError(f"device {device}: this process's group already runs {dist.get_backend()}, not {backend}")
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        if device is not None and device.index is not None and device.index != local_rank:
            if dist.get_world_size() > 1:  # NCCL refuses two processes on one GPU
                raise DeviceError(f"device {device}: under several processes give cuda (each takes its LOCAL_RANK's)")
            local_rank = device.index
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = device if device is not None else torch.device("cpu")  # gloo: the host (an index kept as given)
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), device)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def embedding_collections(module: nn.Module) -> List[EmbeddingBagCollection | EmbeddingCollection]:
    """The torchrec collections of ``module``: pooled (EmbeddingBagCollection) and unpooled (EmbeddingCollection,
    the tables of sequence features)."""
    return [m for m in module.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def table_weights(module: nn.Module) -> Dict[str, nn.Parameter]:
    """Table name -> weight, over every collection of ``module`` (unsharded)."""
    weights = {}
    for collection in embedding_collections(module):
        tables = collection.embedding_bags if isinstance(collection, EmbeddingBagCollection) else collection.embeddings
        weights.update({name: table.weight for name, table in tables.items()})
    return weights


def _constraints(
    tables: List[str], sharding_types: Optional[Sequence[str]], options: Mapping[str, TableOptions]
) -> Optional[Dict[str, ParameterConstraints]]:
    constraints = {}
    for table in tables:
        option = options.get(table, TableOptions())
        types = option.sharding_types or sharding_types
        if types or option.compute_kernels:
            constraints[table] = ParameterConstraints(
                sharding_types=list(types) if types else None,
                compute_kernels=list(option.compute_kernels) if option.compute_kernels else None,
            )
    return constraints or None


def shard_model(
    model: nn.Module,
    env: DistributedEnv,
    embedding_optimizer: str = "rowwise_adagrad",
    embedding_lr: float = 0.05,
    dense_lr: float = 1e-3,
    sharding_types: Optional[List[str]] = None,
    tables: Optional[Mapping[str, TableOptions]] = None,
    memory_budget_bytes: Optional[int] = None,
    dense_optimizer_name: str = "adam",
    weight_decay: float = 0.0,
    clip_norm: float = 0.0,
    print_plan: bool = False,
) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Wrap ``model`` in DistributedModelParallel with a planner-chosen plan and return it with its optimizer.

    Args:
        model: the training module; its EmbeddingBagCollections and EmbeddingCollections are sharded, the rest is
            data parallel.
        env: from ``init_distributed``.
        embedding_optimizer, embedding_lr: the fused optimizer of every table (one of ``EMBEDDING_OPTIMIZERS``),
            unless ``tables`` says otherwise for a table.
        sharding_types: restrict every table to these torchrec sharding types (None: the planner chooses; on one
            process, table-wise: ``ONE_PROCESS_SHARDING``).
        tables: table name -> ``TableOptions`` (sharding types, compute kernels, optimizer, learning rate).
        memory_budget_bytes: the planner's storage per rank (HBM on GPUs, DDR on CPU); None: the device's.
        dense_optimizer_name, dense_lr, weight_decay, clip_norm: the dense optimizer (``DENSE_OPTIMIZERS``),
            gradients clipped to total norm ``clip_norm`` when > 0.
        print_plan: rank 0 prints the chosen plan (table, sharding type, kernel, ranks, shards).
    """
    tables = dict(tables or {})
    for key, optimizer in [("embedding_optimizer", embedding_optimizer),
                           *((f"tables.{t}.optimizer", o.optimizer) for t, o in tables.items() if o.optimizer)]:
        if optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"{key}: expected one of {sorted(EMBEDDING_OPTIMIZERS)}, got {optimizer!r}")
    for sharding_type in [t for o in [TableOptions(sharding_types)] + list(tables.values()) for t in o.sharding_types or []]:
        if sharding_type not in SHARDING_TYPES:
            raise ValueError(f"sharding_types: expected items of {SHARDING_TYPES}, got {sharding_type!r}")
    weights = table_weights(model)
    unknown = sorted(set(tables) - set(weights))
    if unknown:
        raise ValueError(f"tables: {unknown[0]!r} is not a table of the model; its tables: {', '.join(weights)}")
    specs = {t: (o.optimizer or embedding_optimizer, o.lr or embedding_lr) for t, o in tables.items()}
    default = (embedding_optimizer, embedding_lr)
    unfused = _unfused_tables(weights, specs, default, env.device.type, sharding_types, tables)
    for table in unfused:
        tables[table] = dataclasses.replace(tables.get(table, TableOptions()), sharding_types=[DATA_PARALLEL])
    why = ""
    if env.world_size == 1 and sharding_types is None:
        sharding_types = list(ONE_PROCESS_SHARDING)
        why = ONE_PROCESS_WHY if len(unfused) < len(weights) else ""
    if unfused:
        named = ", ".join(unfused) if len(unfused) <= 4 else f"{len(unfused)} tables"
        why += f" ({named}: data_parallel, {DATA_PARALLEL_WHY})"
    apply_embedding_optimizers(weights, specs, default, data_parallel=unfused)
    caps = {"hbm_cap" if env.device.type == "cuda" else "ddr_cap": memory_budget_bytes} if memory_budget_bytes else {}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=env.world_size, compute_device=env.device.type, **caps),
        constraints=_constraints(list(weights), sharding_types, tables),
    )
    # unpooled tables (sequence features) are an EmbeddingCollection: torchrec's sharder offers row-wise on CPU itself
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    try:
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    except PlannerError as error:
        budget = f" within {memory_budget_bytes / 2**30:.2f} GiB per rank" if memory_budget_bytes else ""
        raise ValueError(f"no sharding plan{budget} meets the constraints: {str(error).splitlines()[0]}") from None
    if env.is_main:  # the counts always; the tables and torchrec's whole plan (two lines a table) when asked
        print(f"sharded tables on {env.world_size} process(es): {plan_summary(plan)}{why}"
              + (f"\n{plan_summary(plan, tables=True)}\n{plan}" if print_plan
                 else " (-v or training.print_plan=true prints the plan)"), flush=True)  # fmt: skip
    sharded = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders)
    # data-parallel tables (forced above, or the planner's choice) train outside backward, at their own settings
    unsharded = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    table_of_param = {name: table for name in unsharded if (table := _table_of_weight(name)) in weights}
    replicated_tables = table_optimizers({n: unsharded.pop(n) for n in table_of_param}, table_of_param, specs, default)
    dense = dense_optimizer(unsharded, dense_optimizer_name, dense_lr, weight_decay, clip_norm)
    return sharded, CombinedOptimizer([sharded.fused_optimizer, *replicated_tables, dense])


def _unfused_tables(
    weights: Mapping[str, nn.Parameter],
    specs: Mapping[str, Tuple[str, float]],
    default: Tuple[str, float],
    device_type: str,
    sharding_types: Optional[Sequence[str]],
    tables: Mapping[str, TableOptions],
) -> List[str]:
    """The tables whose optimizer the device's FBGEMM kernels cannot fuse (Adam on CPU), which therefore go
    data-parallel; one the config restricts to other sharding types is a ValueError naming it."""
    if device_type != "cpu":
        return []
    unfused = [table for table in weights if specs.get(table, default)[0] not in FUSED_ON_CPU]
    for table in unfused:
        allowed = tables.get(table, TableOptions()).sharding_types or sharding_types
        if allowed and DATA_PARALLEL not in allowed:
            raise ValueError(
                f"table {table}: optimizer {specs.get(table, default)[0]!r} trains on CPU only in data_parallel "
                f"tables ({DATA_PARALLEL_WHY}), and its sharding types are {list(allowed)}"
            )
    return unfused


def _table_of_weight(parameter_name: str) -> Optional[str]:
    """The table a sharded model's parameter is the weight of (``...embedding_bags.<table>.weight`` or
    ``...embeddings.<table>.weight``), else None."""
    match = re.search(r"\.(?:embedding_bags|embeddings)\.([^.]+)\.weight$", parameter_name)
    return match.group(1) if match else None


def plan_summary(plan: Any, tables: bool = False) -> str:
    """How many tables each sharding type got, as one line: ``2 table_wise, 1 data_parallel``; with ``tables``,
    which: ``table_wise: t_C1, t_C2; data_parallel: t_C3``."""
    by_type: Dict[str, List[str]] = {}
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            by_type.setdefault(sharding.sharding_type, []).append(table)
    if tables:
        return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(by_type.items()))
    return ", ".join(f"{len(names)} {kind}" for kind, names in sorted(by_type.items()))


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``source`` (the whole tensor) into ``target``: a plain tensor, or a ShardedTensor's local shards."""
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            rows, cols = shard.metadata.shard_offsets[0], shard.metadata.shard_offsets[1]
            height, width = shard.tensor.shape
            shard.tensor.copy_(source[rows : rows + height, cols : cols + width])
    else:
        target.copy_(source)


def load_full_state(sharded: nn.Module, full_state: Dict[str, torch.Tensor]) -> None:
    """Copy an unsharded model's state into a sharded one: each rank takes its shards' slices of each table.

    Keys are matched by name (DistributedModelParallel's own ``state_dict`` names); a missing key is an error.
    """
    with torch.no_grad():
        for name, target in sharded.state_dict().items():
            if name not in full_state:
                raise KeyError(f"{name}: not in the unsharded state (it has {len(full_state)} keys)")
            _copy_into(target, full_state[name])


def load_table_weights(sharded: nn.Module, table_name: str, weights: torch.Tensor) -> None:
    """Set embedding table ``table_name`` to ``weights`` [rows, dim] in a sharded (or plain) model, whatever its
    sharding: each rank writes the rows and columns of its own shards."""
    suffixes = (f"embedding_bags.{table_name}.weight", f"embeddings.{table_name}.weight")  # pooled, unpooled
    names = [name for name in sharded.state_dict() if name.endswith(suffixes)]
    if len(names) != 1:
        ends = " or ".join(suffixes)
        raise KeyError(f"table {table_name!r}: expected one state entry ending in {ends}, found {names}")
    with torch.no_grad():
        _copy_into(sharded.state_dict()[names[0]], weights)
