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

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed import embeddingbag
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")


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


def init_distributed(backend: Optional[str] = None) -> DistributedEnv:
    """Join (or create, at world size 1) the default process group: gloo on CPU, NCCL on GPUs.

    Under torchrun the environment names the group; alone, a one-process group on an in-memory store opens no port.
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(
                backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
            )
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), device)


def embedding_collections(module: nn.Module) -> List[EmbeddingBagCollection]:
    return [m for m in module.modules() if isinstance(m, EmbeddingBagCollection)]


def shard_model(
    model: nn.Module,
    env: DistributedEnv,
    embedding_optimizer: str = "rowwise_adagrad",
    embedding_lr: float = 0.05,
    dense_lr: float = 1e-3,
    sharding_types: Optional[List[str]] = None,
) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Wrap ``model`` in DistributedModelParallel with a planner-chosen plan and return it with its optimizer.

    Args:
        model: the training module; its EmbeddingBagCollections are sharded, the rest is data parallel.
        env: from ``init_distributed``.
        embedding_optimizer: one of ``EMBEDDING_OPTIMIZERS``; it runs fused inside backward.
        sharding_types: restrict every table to these torchrec sharding types (None: the planner chooses).
    """
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"embedding_optimizer: expected one of {sorted(EMBEDDING_OPTIMIZERS)}, got {embedding_optimizer!r}"
        )
    for sharding_type in sharding_types or []:
        if sharding_type not in SHARDING_TYPES:
            raise ValueError(f"sharding_types: expected items of {SHARDING_TYPES}, got {sharding_type!r}")
    tables = [table for ebc in embedding_collections(model) for table in ebc.embedding_bag_configs()]
    for ebc in embedding_collections(model):
        apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[embedding_optimizer], ebc.parameters(), {"lr": embedding_lr})
    constraints = (
        {table.name: ParameterConstraints(sharding_types=list(sharding_types)) for table in tables}
        if sharding_types
        else None
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=env.world_size, compute_device=env.device.type),
        constraints=constraints,
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    sharded = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders)
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(sharded.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=dense_lr),
    )
    return sharded, CombinedOptimizer([sharded.fused_optimizer, dense_optimizer])


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
    suffix = f"embedding_bags.{table_name}.weight"
    names = [name for name in sharded.state_dict() if name.endswith(suffix)]
    if len(names) != 1:
        raise KeyError(f"table {table_name!r}: expected one state entry ending in {suffix!r}, found {names}")
    with torch.no_grad():
        _copy_into(sharded.state_dict()[names[0]], weights)
