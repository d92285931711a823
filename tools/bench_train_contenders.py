"""The contenders of tools/bench_train.py (see its docstring): the model's sizes and tasks, the generated batches, our
sharded path and the plain-PyTorch model, and one training-step function per contender."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from torchrec_mtl.build import build_model, build_tower
from torchrec_mtl.config import ModelConfig, TowerConfig
from torchrec_mtl.data.batch import MultiTaskBatch
from torchrec_mtl.model import MultiTaskModel, MultiTaskTrain
from torchrec_mtl.tasks import MultiTaskObjective, TaskSet, TaskSpec
from torchrec_mtl.train.distributed import DistributedEnv, shard_model
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
