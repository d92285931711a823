"""User and item vectors for retrieval, learned beside the ranking tasks: a two-tower arch and its in-batch loss.

``TwoTowerArch`` reads the pooled embeddings the model already looked up (the sparse arch's [B, F, D]): the user
tower maps the user-side features' embeddings, the item tower the item-side features' embeddings fused with the
item's projected text vector (torchrec_mtl.modules.item_text), each to an L2-normalised vector, so ``u . v`` is a
cosine and an item vector can go straight into a nearest-neighbour index. The tables and the text projection are
shared with the ranking tasks: retrieval and ranking train one representation.

``InBatchSoftmax`` is the loss of sampling-bias-corrected retrieval (Yi et al., RecSys 2019): for each positive
(user, item) row of a batch, a softmax over the items of the batch's positive rows, each logit ``u . v / temperature``
minus ``correction x log q(item)``, where q is the item's share of the positive rows in training (its chance of being
an in-batch negative). Without the correction, popular items are over-penalised as negatives and the vectors
under-rank them. Another row with the same item is not a negative; it is masked out.

Example::

    >>> arch = TwoTowerArch(user_columns=[0], item_columns=[1], embedding_dim=8, with_text=False, out_dim=4)
    >>> user, item = arch(torch.randn(5, 3, 8))
    >>> user.shape, item.shape
    (torch.Size([5, 4]), torch.Size([5, 4]))
    >>> loss = InBatchSoftmax(item_counts=torch.tensor([0, 9, 1, 5, 5, 0]), temperature=0.1)
    >>> loss(user, item, torch.tensor([1, 2, 3, 3, 4])).shape
    torch.Size([])
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_mtl.modules.item_text import projection

# The keys under which the model's output dict carries each row's vectors (beside the tower's per-task logits).
USER_VECTOR = "user_vector"
ITEM_VECTOR = "item_vector"


class TwoTowerArch(nn.Module):
    """Pooled embeddings [B, F, D] (+ the item's text vector [B, D]) -> (user [B, out_dim], item [B, out_dim]),
    each row of unit length.

    Args:
        user_columns, item_columns: positions along F of the user-side and item-side features.
        embedding_dim: D.
        with_text: the item tower also takes the projected text vector.
        layer_sizes: hidden sizes of each tower (ReLU between layers, a linear output).
        out_dim: the vectors' width.
    """

    def __init__(
        self,
        user_columns: Sequence[int],
        item_columns: Sequence[int],
        embedding_dim: int,
        with_text: bool,
        layer_sizes: Sequence[int] = (64,),
        out_dim: int = 32,
    ) -> None:
        super().__init__()
        if not user_columns or not item_columns:
            raise ValueError(f"each tower needs a feature; user columns {user_columns}, item columns {item_columns}")
        self.user_columns: List[int] = list(user_columns)
        self.item_columns: List[int] = list(item_columns)
        self.with_text = with_text
        self.user_tower = projection(len(self.user_columns) * embedding_dim, layer_sizes, out_dim)
        self.item_tower = projection((len(self.item_columns) + with_text) * embedding_dim, layer_sizes, out_dim)

    def forward(
        self, embeddings: torch.Tensor, text: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        user = embeddings[:, self.user_columns].flatten(1)
        item = embeddings[:, self.item_columns].flatten(1)
        if self.with_text:
            item = torch.cat([item, text], dim=1)
        return F.normalize(self.user_tower(user), dim=1), F.normalize(self.item_tower(item), dim=1)


class InBatchSoftmax(nn.Module):
    """Softmax over in-batch items with the log-popularity correction; the loss of the positive rows given.

    Args:
        item_counts: per item-table row, its number of positive rows in the training split (q = count / total; a
            row with none gets one, so its log is finite).
        temperature: the logits are cosines divided by this.
        correction: the weight of ``log q`` (1: the unbiased estimate; 0: no correction).
    """

    def __init__(self, item_counts: torch.Tensor, temperature: float = 0.1, correction: float = 1.0) -> None:
        super().__init__()
        counts = item_counts.double().clamp(min=1.0)
        # not persistent: derived from the data, so checkpoints stay the model's weights alone
        self.register_buffer("log_q", (counts / counts.sum()).log().float(), persistent=False)
        self.temperature = temperature
        self.correction = correction

    def forward(self, user: torch.Tensor, item: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Mean loss over the rows given (the positive ones): ``user``/``item`` [N, d], ``item_rows`` [N]."""
        if user.shape[0] == 0:
            return (user.sum() + item.sum()) * 0.0  # keeps the graph (and DDP's gradient hooks) whole
        logits = user @ item.t() / self.temperature
        logits = logits - self.correction * self.log_q[item_rows].unsqueeze(0)
        same_item = item_rows.unsqueeze(0) == item_rows.unsqueeze(1)
        same_item.fill_diagonal_(False)
        logits = logits.masked_fill(same_item, float("-inf"))
        return F.cross_entropy(logits, torch.arange(user.shape[0], device=user.device))
