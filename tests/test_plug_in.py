"""Our towers in a TorchRec user's own model: torchrec.models.dlrm parts, torchrec's Batch, DistributedModelParallel
and TrainPipelineSparseDist used exactly as torchrec documents them, with an MMoE tower in place of DLRM's top MLP."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DenseArch, SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mtl.modules.towers import MMoE

FEATURES, ROWS, DIM, DENSE = ["user", "item"], 50, 8, 4
TASKS = ["click", "like"]


class UserModel(nn.Module):
    """What a TorchRec user writes: dlrm's SparseArch and DenseArch, their outputs concatenated, our MMoE on top."""

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(ebc)
        self.dense_arch = DenseArch(DENSE, [16, DIM])
        self.tower = MMoE((len(FEATURES) + 1) * DIM, TASKS, num_experts=3, expert_layer_sizes=[32, 16])

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        embedded = self.sparse_arch(sparse).flatten(1)  # [B, F * D]
        return self.tower(torch.cat([self.dense_arch(dense), embedded], dim=1))


class UserTrain(nn.Module):
    """torchrec's Batch has one label tensor: here [B, 2], one column per task."""

    def __init__(self, model: UserModel) -> None:
        super().__init__()
        self.model = model
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        stacked = torch.stack([logits[task] for task in TASKS], dim=1)
        loss = self.loss(stacked, batch.labels)
        return loss, (loss.detach(), stacked.detach())


def _batches(count: int, size: int = 64, seed: int = 0) -> Iterator[Batch]:
    """click = the user's row is even; like = the item's row is below 10: each task is learnable from one table."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, ROWS, (len(FEATURES), size), generator=generator)
        labels = torch.stack([(ids[0] % 2 == 0).float(), (ids[1] < 10).float()], dim=1)
        yield Batch(
            dense_features=torch.randn(size, DENSE, generator=generator),
            sparse_features=KeyedJaggedTensor.from_lengths_sync(
                keys=FEATURES, values=ids.reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
            ),
            labels=labels,
        )


def test_mmoe_in_a_dlrm_built_model_trains_under_train_pipeline_sparse_dist():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f]) for f in FEATURES
    ]
    train_module = UserTrain(UserModel(EmbeddingBagCollection(tables=tables, device=torch.device("meta"))))
    apply_optimizer_in_backward(torch.optim.Adagrad, train_module.model.sparse_arch.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(train_module, device=torch.device("cpu"), sharders=[EmbeddingBagCollectionSharder()])
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda params: torch.optim.Adam(params, lr=0.01)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))

    batches = _batches(160)
    losses = []
    while True:
        try:
            loss, _ = pipeline.progress(batches)
        except StopIteration:
            break
        losses.append(float(loss))
    assert len(losses) == 160
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, f"mean loss {first:.3f} -> {last:.3f}: the tower did not learn through the pipeline"

    pipeline.detach()  # back to the plain forward for a direct call
    dmp.eval()
    with torch.no_grad():
        batch = next(_batches(1, size=512, seed=1))
        _, (_, probabilities) = dmp(batch)
    accuracy = ((probabilities > 0) == (batch.labels > 0.5)).float().mean(dim=0)
    assert (accuracy > 0.9).all(), f"per-task accuracy {accuracy.tolist()}"
