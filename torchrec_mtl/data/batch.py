"""The multi-task batch: what the loader yields and the pipelines move between devices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# the keys of ``augmentation`` for text mixing (torchrec_mtl.data.augment): each row's partner row in the batch and
# the partner's share of the mixed text vector (0: the row's own vector)
TEXT_MIX_PARTNER = "text_mix_partner"
TEXT_MIX_WEIGHT = "text_mix_weight"


@dataclass
class MultiTaskBatch(Pipelineable):
    """Dense features, sparse features and one label tensor per label column.

    A missing label is NaN in ``labels``; ``label_mask(name)`` is the one place that turns that into a mask, so the
    loss and the metrics agree on which rows belong to a task.

    Args:
        dense_features: [B, num_dense] float32.
        sparse_features: KeyedJaggedTensor with one key per categorical feature.
        labels: label column name -> [B] float32.
        row_weight: [B] float32; 0 marks padding rows that the loader added to even out ranks (they count nowhere).
        augmentation: what a training loader drew for the model to apply (``TEXT_MIX_*``); empty otherwise.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: Dict[str, torch.Tensor]
    row_weight: torch.Tensor
    augmentation: Dict[str, torch.Tensor] = field(default_factory=dict)

    def label_mask(self, name: str) -> torch.Tensor:
        return ~torch.isnan(self.labels[name]) & (self.row_weight > 0)

    def to(self, device: torch.device, non_blocking: bool = False) -> "MultiTaskBatch":
        return MultiTaskBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.labels.items()},
            row_weight=self.row_weight.to(device=device, non_blocking=non_blocking),
            augmentation={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.augmentation.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        for tensor in self.labels.values():
            tensor.record_stream(stream)
        self.row_weight.record_stream(stream)
        for tensor in self.augmentation.values():
            tensor.record_stream(stream)

    def pin_memory(self) -> "MultiTaskBatch":
        return MultiTaskBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            row_weight=self.row_weight.pin_memory(),
            augmentation={k: v.pin_memory() for k, v in self.augmentation.items()},
        )
