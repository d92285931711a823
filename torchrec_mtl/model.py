"""The multi-task model: TorchRec sparse and dense archs, pairwise interactions, then a multi-task tower.

``MultiTaskModel`` maps features to one logit per tower task; ``MultiTaskTrain`` adds the objective and returns
``(loss, (loss, predictions, labels))`` the way torchrec's ``DLRMTrain`` does, so ``TrainPipelineSparseDist`` drives
it unchanged.

Example::

    >>> ebc = EmbeddingBagCollection(tables=[...], device=torch.device("meta"))  # doctest: +SKIP
    >>> in_features = MultiTaskModel.tower_in_features(num_sparse_features=8, embedding_dim=16)
    >>> model = MultiTaskModel(ebc, 13, [64, 16], MMoE(in_features, ["ctr", "cvr", "rating"]))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, SparseArch, choose
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mtl.data.batch import TEXT_MIX_PARTNER, TEXT_MIX_WEIGHT, MultiTaskBatch
from torchrec_mtl.modules import adversarial
from torchrec_mtl.modules.interactions import DotInteraction
from torchrec_mtl.modules.item_text import ItemTextArch
from torchrec_mtl.modules.sequence import InterestArch, SequenceLookups
from torchrec_mtl.modules.two_tower import ITEM_VECTOR, USER_VECTOR, TwoTowerArch
from torchrec_mtl.precision import GradientUnscale, Precision
from torchrec_mtl.tasks import MultiTaskObjective
from torchrec_mtl.protocols import NeedsSharedParameters


@torch.fx.wrap
def with_vectors(outputs: Dict[str, torch.Tensor], user: torch.Tensor, item: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The tower's outputs plus each row's retrieval vectors. One call in a traced graph: the pipeline traces the
    model with the tower as a leaf, whose output dict cannot be written into there."""
    merged = dict(outputs)
    # the names as literals: an export scripts this function, and TorchScript reads no module-level str (the
    # assertion below the function holds them to the constants)
    merged["user_vector"] = user
    merged["item_vector"] = item
    return merged


assert (USER_VECTOR, ITEM_VECTOR) == ("user_vector", "item_vector"), "with_vectors writes these names"


@torch.fx.wrap
def in_float32(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The outputs of an autocast region back in fp32, for the objective; one call in a traced graph (as above)."""
    return {name: value.float() for name, value in outputs.items()}


class OrderedSparseArch(SparseArch):
    """torchrec's SparseArch with the pooled embeddings in a given feature order.

    SparseArch stacks them table after table, each table's features together; when a list shares another column's
    table (torchrec_mtl.embedding_tables) that order is no longer the features' own, and the two-tower arch and the
    interaction read positions. ``feature_names`` (None: the tables' order) puts them back.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> tables = [
        ...     EmbeddingBagConfig(name="t_item", embedding_dim=2, num_embeddings=5, feature_names=["item", "history"]),
        ...     EmbeddingBagConfig(name="t_user", embedding_dim=2, num_embeddings=5, feature_names=["user"]),
        ... ]
        >>> OrderedSparseArch(EmbeddingBagCollection(tables=tables), ["user", "item", "history"]).sparse_feature_names
        ['user', 'item', 'history']
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, feature_names: Optional[List[str]] = None):
        super().__init__(embedding_bag_collection)
        if feature_names is not None:
            if sorted(feature_names) != sorted(self._sparse_feature_names):
                raise ValueError(f"feature_names {feature_names} are not the tables' {self._sparse_feature_names}")
            self._sparse_feature_names = list(feature_names)


class SequenceSparseArch(nn.Module):
    """The lookups of a model with sequence features: the pooled tables (an EmbeddingBagCollection, None when every
    table is unpooled) and the unpooled ones (an EmbeddingCollection: the tables a sequence feature looks up,
    torchrec_mtl.embedding_tables), each given the whole KeyedJaggedTensor (a collection, sharded or not, reads the
    features of its own tables and ignores the rest), then ``SequenceLookups``:
    ``(embeddings [B, F, D], history [B, L, S * D], lengths [B], query [B, S * D])``.

    Both collections take the batch's KeyedJaggedTensor as it is, so TorchRec's pipeline finds and pipelines both
    sharded modules' input distribution."""

    def __init__(
        self,
        embedding_bag_collection: Optional[EmbeddingBagCollection],
        embedding_collection: EmbeddingCollection,
        lookups: SequenceLookups,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.embedding_collection = embedding_collection
        self.lookups = lookups

    @property
    def sparse_feature_names(self) -> List[str]:
        """The features of the output's embeddings (the non-sequence ones), in order."""
        return list(self.lookups.feature_names)

    def forward(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The whole KJT to each (torchrec 1.9.2): unsharded, both forwards look their tables' feature names up in
        # features.to_dict(); sharded, _create_input_dist keeps the input positions of the features the shardings
        # own, input_dist permutes to those alone (or, when they are already the leading keys, splits them off by
        # count) and nothing else is sent.
        pooled = self.embedding_bag_collection(features) if self.embedding_bag_collection is not None else None
        return self.lookups(pooled, self.embedding_collection(features))


class MultiTaskModel(nn.Module):
    """Sparse arch (EmbeddingBagCollection) + dense arch (MLP) -> interaction (default: [dense, pairwise dots,
    embeddings]) -> tower.

    Args:
        embedding_bag_collection: the tables of the categorical features (one per single-ID feature, lists in
            their own or a shared one: torchrec_mtl.embedding_tables), all of the same embedding dim.
        dense_in_features: number of dense (integer) features.
        dense_arch_layer_sizes: MLP sizes for the dense features; the last must equal the embedding dim, or empty:
            the dense features reach the interaction raw (one that takes any width: concat, dcn).
        tower: module mapping [B, tower_in_features(...)] to a dict of per-task logits.
        item_text: optional projected item-text vector (torchrec_mtl.modules.item_text), one more embedding of the
            embedding dim beside the categorical ones (count it in ``tower_in_features``).
        retrieval: optional two-tower arch (torchrec_mtl.modules.two_tower) over the same embeddings (and text);
            its user and item vectors join the output under ``USER_VECTOR`` and ``ITEM_VECTOR``.
        interaction: what makes the tower's input of the dense output and the embeddings
            (torchrec_mtl.modules.interactions; its ``out_features`` is the tower's width); default DLRM's dots.
        feature_names: the order of the pooled embeddings (``OrderedSparseArch``; None: the tables' order).
        embedding_collection, lookups, interest: a model with sequence features (``model.sequence``): the unpooled
            tables (``embedding_bag_collection`` then holds the others, or is None when there are none), how their
            outputs are read (``SequenceLookups``, whose ``feature_names`` replace ``feature_names``) and the
            attention over the history (``InterestArch``), whose vector joins the embeddings as one more (after
            the features', before the item text's).
    """

    def __init__(
        self,
        embedding_bag_collection: Optional[EmbeddingBagCollection],
        dense_in_features: int,
        dense_arch_layer_sizes: List[int],
        tower: nn.Module,
        item_text: Optional[ItemTextArch] = None,
        retrieval: Optional[TwoTowerArch] = None,
        interaction: Optional[nn.Module] = None,
        feature_names: Optional[List[str]] = None,
        embedding_collection: Optional[EmbeddingCollection] = None,
        lookups: Optional[SequenceLookups] = None,
        interest: Optional[InterestArch] = None,
    ) -> None:
        super().__init__()
        if (embedding_collection is None) != (interest is None) or (embedding_collection is None) != (lookups is None):
            raise ValueError("embedding_collection, lookups and interest: give all three (sequence features) or none")
        configs = [*(embedding_bag_collection.embedding_bag_configs() if embedding_bag_collection is not None else []),
                   *(embedding_collection.embedding_configs() if embedding_collection is not None else [])]  # fmt: skip
        dims = {table.embedding_dim for table in configs}
        if len(dims) != 1 or (dense_arch_layer_sizes and dense_arch_layer_sizes[-1] not in dims):
            raise ValueError(
                f"all tables and the dense arch's last layer need one embedding dim; tables {sorted(dims)}, "
                f"dense arch ends at {dense_arch_layer_sizes[-1] if dense_arch_layer_sizes else None}"
            )
        self.sparse_arch: nn.Module
        if embedding_collection is None:
            self.sparse_arch = OrderedSparseArch(embedding_bag_collection, feature_names)
        else:
            self.sparse_arch = SequenceSparseArch(embedding_bag_collection, embedding_collection, lookups)
        self.interest = interest
        self.dense_arch: nn.Module = (
            DenseArch(dense_in_features, dense_arch_layer_sizes) if dense_arch_layer_sizes else nn.Identity()
        )
        if interaction is None and not dense_arch_layer_sizes:
            raise ValueError("the default (dot) interaction needs a dense arch ending at the embedding dim")
        self.item_text = item_text
        num_embeddings = len(self.sparse_arch.sparse_feature_names) + (interest is not None) + (item_text is not None)
        self.interaction = interaction or DotInteraction(num_embeddings, dense_arch_layer_sizes[-1])
        self.tower = tower
        self.retrieval = retrieval
        self.precision: Optional[Precision] = None  # None: fp32, no autocast (``use_precision``)
        self.gradient_unscale: Optional[GradientUnscale] = None  # fp16: on the lookups' outputs

    @staticmethod
    def tower_in_features(num_sparse_features: int, embedding_dim: int) -> int:
        """Width of the tower input with the default interaction: dense output, flattened embeddings, pairwise dot
        products."""
        return embedding_dim * (1 + num_sparse_features) + choose(num_sparse_features + 1, 2)

    def use_precision(self, precision: Precision) -> None:
        """Run the dense part (dense arch, interaction, tower, retrieval towers) under ``precision``'s autocast, the
        lookups outside it; under fp16 the gradients reaching the tables are unscaled (torchrec_mtl.precision)."""
        self.precision = precision if precision.dtype is not None else None
        if precision.scaler is not None:
            self.gradient_unscale = GradientUnscale(precision.scaler)
            if isinstance(self.item_text, ItemTextArch) and self.item_text.trainable:
                self.item_text.gradient_unscale = GradientUnscale(precision.scaler)

    def _autocast(self) -> ContextManager:
        return self.precision.autocast() if self.precision is not None else contextlib.nullcontext()

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        embedded_dense, embedded_ids, text = self.embed(dense_features, sparse_features)
        return self.head(embedded_dense, embedded_ids, text)

    def embed(
        self,
        dense_features: torch.Tensor,
        sparse_features: KeyedJaggedTensor,
        text_mix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The lookups and the dense arch: ``(dense output [B, D], pooled ID embeddings [B, F, D] (with sequence
        features: the other features' and then the interest vector), projected text [B, D] or None)``. ``text_mix``
        (``(partner rows, weights)``, training only) mixes each row's text vector with its partner's before the
        projection (torchrec_mtl.data.augment)."""
        with self._autocast():
            embedded_dense = self.dense_arch(dense_features)
        embedded_ids = self.embedded_ids(sparse_features)
        text = None
        if self.item_text is not None:
            text = self.item_text(sparse_features) if text_mix is None else self.item_text(sparse_features, text_mix)
        return embedded_dense, embedded_ids, text

    def embedded_ids(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """[B, F, D]: one vector per feature, looked up in fp32 whatever the precision; with sequence features one
        per non-sequence feature, then the interest vector (the attention runs under the precision's autocast, on
        lookups whose gradients fp16 unscales first: the tables see true gradients, the attention's own parameters
        scaled ones, as the dense optimizer expects)."""
        if self.interest is None:
            embedded_ids = self.sparse_arch(sparse_features)
            return embedded_ids if self.gradient_unscale is None else self.gradient_unscale(embedded_ids)
        # indexed, not unpacked: the pipeline traces this, and a traced module's output is one proxy
        looked_up = self.sparse_arch(sparse_features)
        embedded_ids, history, lengths, query = looked_up[0], looked_up[1], looked_up[2], looked_up[3]
        if self.gradient_unscale is not None:
            embedded_ids = self.gradient_unscale(embedded_ids)
            history, query = self.gradient_unscale(history), self.gradient_unscale(query)
        with self._autocast():
            interest = self.interest(query, history, lengths)
        return torch.cat([embedded_ids, interest.unsqueeze(1).to(embedded_ids.dtype)], dim=1)

    def head(
        self, embedded_dense: torch.Tensor, embedded_ids: torch.Tensor, text: Optional[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Everything after the lookups: the interaction, the tower and the two-tower arch. Apart from ``embed`` so
        that adversarial training (torchrec_mtl.modules.adversarial) runs it again on perturbed embeddings."""
        embedded_sparse = embedded_ids if text is None else torch.cat([embedded_ids, text.unsqueeze(1)], dim=1)
        with self._autocast():
            outputs = self.tower(self.interaction(embedded_dense, embedded_sparse))
            if self.retrieval is not None:
                user, item = self.retrieval(embedded_ids, text)
                outputs = with_vectors(outputs, user, item)
        return outputs if self.precision is None else in_float32(outputs)

    def retrieval_vectors(self, sparse_features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two-tower arch's (user, item) vectors of each row, without the tower (for exporting them)."""
        if self.retrieval is None:
            raise ValueError("the model has no retrieval arch (declare a task of kind retrieval)")
        text = self.item_text(sparse_features) if self.item_text is not None else None
        return self.retrieval(self.embedded_ids(sparse_features), text)


class MultiTaskTrain(nn.Module):
    """The model plus its objective, with torchrec's DLRMTrain contract.

    ``forward(batch)`` returns ``(loss, (loss.detach(), predictions, labels))``; ``predictions`` and ``labels`` map
    each evaluated task to a [B] tensor, and a label is NaN on rows outside that task's sample space. With a
    ``precision`` (torchrec_mtl.precision) the model's dense part runs under its autocast, and under fp16 the first
    ``loss`` (the one backpropagated) is scaled.

    Training options (``training.adversarial``, ``training.augmentation``; both act in training steps only):
    ``adversarial_epsilon`` > 0 adds FGM's adversarial loss on the embeddings (torchrec_mtl.modules.adversarial; the
    loss returned is then clean + adversarial); ``text_mix`` mixes each row's item-text vector with the partner the
    loader drew (the batch's ``augmentation``, torchrec_mtl.data.augment). At their defaults the forward is the
    plain one, bit for bit.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        objective: MultiTaskObjective,
        precision: Optional[Precision] = None,
        adversarial_epsilon: float = 0.0,
        text_mix: bool = False,
    ) -> None:
        super().__init__()
        if adversarial_epsilon < 0:
            raise ValueError(f"adversarial_epsilon: {adversarial_epsilon}; allowed: >= 0")
        self.model = model
        self.objective = objective
        if precision is not None:  # training.precision: the model's autocast, fp16's loss scaling
            model.use_precision(precision)
            objective.loss_scaler = precision.scaler
        self.adversarial_epsilon = float(adversarial_epsilon)
        self.text_mix = text_mix and model.item_text is not None
        # gradient-level weighting and diagnostics measure on the shared tower parameters
        for part in (objective.weighting, objective.gradient_cosine):
            if isinstance(part, NeedsSharedParameters):
                part.attach(model.tower.shared_parameters())

    def forward(
        self, batch: MultiTaskBatch
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
        # No unpacking here: the pipeline FX-traces this forward, and the objective (a leaf) returns a proxy. The
        # branches read module attributes only (a traced batch is a proxy).
        adversarial_step = self.adversarial_epsilon > 0 and self.training
        text_mix = self.text_mix and self.training
        if not (adversarial_step or text_mix):
            return self.objective(self.model(batch.dense_features, batch.sparse_features), batch)
        mix = (batch.augmentation[TEXT_MIX_PARTNER], batch.augmentation[TEXT_MIX_WEIGHT]) if text_mix else None
        embedded = self.model.embed(batch.dense_features, batch.sparse_features, mix)
        if not adversarial_step:
            return self.objective(self.model.head(*embedded), batch)
        return adversarial.adversarial_loss(self.model, self.objective, embedded, batch, self.adversarial_epsilon)
