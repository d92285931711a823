"""Pruning at export: embedding rows training barely touched go, and the tower's dense weights of least magnitude are
zeroed, in the exported copy of a trained model (the checkpoint is not changed).

Rows: the ``rows`` share of the ID tables' rows with the lowest score is removed, ranked across all tables
(``scope="all"``: a small table whose rows are all used often keeps them) or within each table (``"table"``); the
score is how often the training split looks the row up (``count``, from the preprocessed shards: no training change)
or its L2 norm (``norm``). Row 0, the row every missing, rare and unseen ID already shares, is never pruned, and a pruned
row's IDs go to it: a ``RowRemap`` inside the artifact (the kept rows' original numbers, sorted) maps each input
row to its place in the smaller table, or to row 0, so ``model.pt`` still takes the encoded table rows and
``serve.pt`` raw log rows. The item-text table (cached text vectors, frozen) is not pruned: it is what cold items
are scored with. Tables are those of torchrec_mtl.embedding_tables, named by their owning feature: a list's
elements count toward the table it looks up (a history sharing the item's table, toward the item's), and a
``ListRowRemap`` remaps them inside the artifact as the table's own column is remapped. A sequence model's unpooled
tables (its EmbeddingCollection: the histories it attends over and the columns they share) are pruned alike.

Dense: each linear layer's weight of the tower (each expert's layers, gates, heads) loses the ``dense`` share of its
entries of least magnitude (``torch.nn.utils.prune.l1_unstructured``, then ``prune.remove``: plain weights with zeros
in them, no masks; an ``ExpertBank``'s slices, one expert's layer each, by the same rule). Zeros are stored like any
float, so they shrink the artifact only once it is compressed.

Example::

    >>> trained = load_trained("runs/main/checkpoints")  # doctest: +SKIP
    >>> module, report = prune_for_export(trained, Pruning(rows=0.9, by="count", dense=0.5))  # doctest: +SKIP
    >>> report["rows"]["tables"]["C1"]  # doctest: +SKIP
    {'rows': 4001, 'kept': 577, 'pruned': 3424, 'accesses_pruned': 0.59708}
    >>> choose_rows({"C1": np.array([9, 1, 5, 0, 7])}, 0.4)["C1"].tolist()  # the two lowest scores go, row 0 stays
    [0, 2, 4]
"""

# No "from __future__ import annotations": FX writes PrunedModel.forward's annotations into the traced code, and
# TorchScript must read them as types.
import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from torchrec.modules.embedding_modules import EmbeddingBagCollection

if TYPE_CHECKING:
    from torchrec_mtl.inference import InferenceModel, TrainedModel

CRITERIA = ("count", "norm")
SCOPES = ("all", "table")  # rank the rows of all ID tables together, or prune each table by the same share
INT32_ROWS = 2**31 - 1  # tables below this many rows keep their row numbers as int32 in the artifact


@dataclass(frozen=True)
class Pruning:
    """What ``export`` prunes: ``rows``, the share of the ID tables' rows removed (0 <= rows < 1), of all tables
    together or of each (``scope``: ``all`` or ``table``), chosen ``by`` ``count`` (training lookups) or ``norm`` (the
    row's L2 norm); ``dense``, the share of each tower linear layer's weights zeroed by magnitude (0 <= dense < 1).

    >>> Pruning(rows=0.9).active, Pruning().active
    (True, False)
    """

    rows: float = 0.0
    by: str = "count"
    dense: float = 0.0
    scope: str = "all"

    def __post_init__(self) -> None:
        if self.by not in CRITERIA:
            raise ValueError(f"pruning by {self.by!r}; allowed: {', '.join(CRITERIA)}")
        if self.scope not in SCOPES:
            raise ValueError(f"pruning scope {self.scope!r}; allowed: {', '.join(SCOPES)}")
        for name in ("rows", "dense"):
            if not 0.0 <= getattr(self, name) < 1.0:  # False for NaN
                raise ValueError(f"pruning {name}: expected 0 <= share < 1, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        """Whether anything is pruned (the default prunes nothing: the export is the unpruned model's)."""
        return self.rows > 0 or self.dense > 0


def choose_rows(scores: Dict[str, np.ndarray], share: float, scope: str = "all") -> Dict[str, np.ndarray]:
    """Per table the rows kept (sorted) when ``share`` of the rows are pruned, lowest score first: of all tables'
    rows together (``scope="all"``: a table whose rows are all used often keeps them) or of each table's own
    (``"table"``). Ties go by table, then row number, so the choice is the same every time; row 0 of each table is
    always kept. ``share`` times the rows is rounded down.

    >>> choose_rows({"a": np.array([9, 1, 5, 0, 7]), "b": np.array([0, 8, 8])}, 0.25)
    {'a': array([0, 2, 4]), 'b': array([0, 1, 2])}
    >>> choose_rows({"a": np.array([9, 1, 5, 0, 7]), "b": np.array([0, 8, 8])}, 0.5, "table")
    {'a': array([0, 2, 4]), 'b': array([0, 2])}
    """
    if scope not in SCOPES:
        raise ValueError(f"pruning scope {scope!r}; allowed: {', '.join(SCOPES)}")
    groups = [list(scores)] if scope == "all" else [[name] for name in scores]
    kept: Dict[str, np.ndarray] = {}
    for names in groups:
        # every row but row 0, as (table, row, score), ranked by score, then table, then row
        tables = np.concatenate([np.full(len(scores[n]) - 1, i) for i, n in enumerate(names)])
        rows = np.concatenate([np.arange(1, len(scores[n])) for n in names])
        values = np.concatenate([np.asarray(scores[n], dtype=np.float64)[1:] for n in names])
        # the epsilon: 0.57 * 100 is 56.99999999999999 in floating point, and means 57 rows
        count = min(int(share * sum(len(scores[n]) for n in names) + 1e-9), len(rows))
        order = np.lexsort((rows, tables, values))[:count]
        for i, name in enumerate(names):
            keep = np.ones(len(scores[name]), dtype=bool)
            keep[rows[order][tables[order] == i]] = False
            kept[name] = np.flatnonzero(keep)
    return kept


class RowRemap(nn.Module):
    """``forward(sparse_ids [B, F])`` -> the same ids with each pruned column's original rows replaced by their place
    among the kept rows, and a row that was pruned (or was never in the table) by 0, the shared row. FX-traceable
    (the export traces, then scripts it: each table's kept rows become a constant of the artifact); columns not in
    ``kept`` pass through.

    >>> remap = RowRemap(2, {1: np.array([0, 3, 7])})
    >>> remap(torch.tensor([[5, 7], [5, 3], [5, 4]])).tolist()
    [[5, 2], [5, 1], [5, 0]]
    """

    def __init__(self, num_columns: int, kept: Dict[int, np.ndarray]) -> None:
        super().__init__()
        self.num_columns = num_columns
        largest = max((int(rows[-1]) for rows in kept.values() if len(rows)), default=0)
        # int32 row numbers halve what the remap adds to the artifact; the batch's ids are cast to them, not the table
        self.index_dtype = torch.int32 if largest < INT32_ROWS else torch.int64
        self.limit = INT32_ROWS if self.index_dtype == torch.int32 else 2**63 - 1
        self.spans = {}  # column -> (start, end) of its kept rows in kept_rows
        start = 0
        for column, rows in sorted(kept.items()):
            if len(rows) == 0 or rows[0] != 0:
                raise ValueError(f"column {column}: the kept rows must start with row 0, the shared row")
            self.spans[column] = (start, start + len(rows))
            start += len(rows)
        parts = [np.asarray(kept[column], dtype=np.int64) for column in sorted(kept)]
        flat = np.concatenate([np.zeros(0, np.int64), *parts])
        self.register_buffer("kept_rows", torch.from_numpy(flat).to(self.index_dtype))

    def forward(self, sparse_ids: torch.Tensor) -> torch.Tensor:
        # a Python loop over constant columns: FX unrolls it into one lookup per pruned column
        columns: List[torch.Tensor] = []
        for column in range(self.num_columns):
            ids = sparse_ids[:, column]
            if column in self.spans:
                ids = self._remap(ids, column)
            columns.append(ids)
        return torch.stack(columns, dim=1)

    def _remap(self, ids: torch.Tensor, column: int) -> torch.Tensor:
        """``ids`` (rows of the table of ``column``) -> their places among its kept rows, 0 where pruned."""
        start, end = self.spans[column]
        kept = self.kept_rows[start:end]
        # an id beyond int32 is in no table here: clamped, it finds no kept row and goes to row 0
        probe = ids.clamp(0, self.limit).to(self.index_dtype).contiguous()
        position = torch.searchsorted(kept, probe).clamp(max=end - start - 1)
        return torch.where(kept[position] == probe, position, 0)


class ListRowRemap(RowRemap):
    """``forward(list_values [N], list_lengths [L, B])`` -> the values with each pruned list's rows remapped as
    RowRemap remaps a column: ``kept`` is keyed by list (its place among the L lists), whose rows are the kept rows of
    the table it looks up (its own, or the column's it shares: remapped as that column is). FX-traceable.

    >>> remap = ListRowRemap(2, {1: np.array([0, 3, 7])})
    >>> remap(torch.tensor([5, 7, 7, 3, 4]), torch.tensor([[2], [3]])).tolist()  # list 0: [5, 7]; list 1: [7, 3, 4]
    [5, 7, 2, 1, 0]
    """

    def forward(self, list_values: torch.Tensor, list_lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # which list each value belongs to (values are list after list): no data-dependent split of the values
        owner = torch.repeat_interleave(
            torch.arange(self.num_columns, device=list_values.device), list_lengths.sum(dim=1).to(torch.int64)
        )
        for column in range(self.num_columns):  # unrolled by FX, as RowRemap's
            if column in self.spans:
                list_values = torch.where(owner == column, self._remap(list_values, column), list_values)
        return list_values


class PrunedModel(nn.Module):
    """An InferenceModel whose ID tables were pruned, behind the ``RowRemap`` of its inputs: the same call,
    ``forward(dense_features [B, num_dense], sparse_ids [B, num_features])`` -> {task: [B]}."""

    def __init__(self, remap: RowRemap, model: nn.Module) -> None:
        super().__init__()
        self.remap, self.model = remap, model

    def forward(self, dense_features: torch.Tensor, sparse_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.model(dense_features, self.remap(sparse_ids))


class ListPrunedModel(nn.Module):
    """A ListInferenceModel whose ID tables were pruned, behind the remaps of its single-ID and list inputs: the
    same call, ``forward(dense_features, sparse_ids, list_values, list_lengths)`` -> {task: [B]}."""

    def __init__(self, remap: RowRemap, list_remap: ListRowRemap, model: nn.Module) -> None:
        super().__init__()
        self.remap, self.list_remap, self.model = remap, list_remap, model

    def forward(
        self, dense_features: torch.Tensor, sparse_ids: torch.Tensor, list_values: torch.Tensor,
        list_lengths: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:  # fmt: skip
        values = self.list_remap(list_values, list_lengths)
        return self.model(dense_features, self.remap(sparse_ids), values, list_lengths)


def access_counts(trained: "TrainedModel") -> Dict[str, np.ndarray]:
    """How often the preprocessed training split looks up each row of each ID table, keyed by the table's owning
    feature (torchrec_mtl.embedding_tables: ``t_<owner>``): a single ID counts once toward its own table, every
    element of a list (as kept) once toward the table it looks up, its own or the column's it shares. The rows are
    the run's data folder's; a ShardError naming it when it is gone or does not match the checkpoint's tables."""
    from torchrec_mtl.data.prepare import shards_dir
    from torchrec_mtl.data.shards import ShardedLog, ShardError
    from torchrec_mtl.embedding_tables import embedding_tables, table_owner

    log = ShardedLog.open(shards_dir(trained.config.data))
    sizes = trained.inputs["table_sizes"]
    if log.table_sizes != sizes:
        raise ShardError(f"{log.root}: its tables {log.table_sizes} are not the checkpoint's {sizes}; pruning by "
                         "count needs the data the run was trained on")  # fmt: skip
    lists = log.lists
    counts = {table.features[0]: np.zeros(table.rows, dtype=np.int64) for table in embedding_tables(sizes, lists)}
    for shard in log.split("train"):
        # the shards' sparse columns are the single-ID features, in order; the lists are apart (padded)
        for column, feature in enumerate(log.single_id_features):
            owner = table_owner(feature, lists)
            counts[owner] += np.bincount(np.asarray(shard.sparse[:, column]), minlength=len(counts[owner]))
        for feature, column in shard.lists.items():
            owner = table_owner(feature, lists)
            values, _ = column.flat(np.arange(len(column)))  # each row's kept elements, not the padding after them
            counts[owner] += np.bincount(values, minlength=len(counts[owner]))
    return counts


# The attributes of a model's sparse arch that hold ID tables: its EmbeddingBagCollection (pooled) and, with sequence
# features, its EmbeddingCollection (the unpooled tables they look up; the bags may then be None).
COLLECTIONS = ("embedding_bag_collection", "embedding_collection")


def id_collections(inference: nn.Module) -> Dict[str, nn.Module]:
    """The ID tables' collections of ``inference``'s model, by their attribute on its sparse arch."""
    arch = inference.model.sparse_arch
    return {name: getattr(arch, name) for name in COLLECTIONS if getattr(arch, name, None) is not None}


def _tables(collection: nn.Module) -> List[Tuple[Any, nn.Module]]:
    """Each table of an EmbeddingBagCollection or an EmbeddingCollection: (its config, its module)."""
    if isinstance(collection, EmbeddingBagCollection):
        return [(config, collection.embedding_bags[config.name]) for config in collection.embedding_bag_configs()]
    return [(config, collection.embeddings[config.name]) for config in collection.embedding_configs()]


def row_norms(inference: nn.Module) -> Dict[str, np.ndarray]:
    """Each row's L2 norm, per ID table of ``inference``'s model (pooled or not), keyed by its owning feature (the
    first of its features, as torchrec_mtl.embedding_tables lays them out: ``t_<owner>``)."""
    return {config.feature_names[0]: table.weight.detach().norm(dim=1).cpu().numpy()
            for collection in id_collections(inference).values() for config, table in _tables(collection)}  # fmt: skip


def prune_rows(
    inference: nn.Module, kept: Dict[str, np.ndarray]
) -> Tuple[RowRemap, Optional[ListRowRemap], Dict]:
    """Replace ``inference``'s ID tables (in place, those of its EmbeddingCollection too) by tables of their ``kept``
    rows (per table, keyed by its owning feature, sorted, from row 0); return the remap of its ``sparse_ids``, that of
    its list values (a ListInferenceModel; else None) and, per table, its rows, those kept and pruned."""
    arch = inference.model.sparse_arch
    configs = []
    for attribute, collection in id_collections(inference).items():
        tables = _tables(collection)
        configs += [config for config, _ in tables]
        device = tables[0][1].weight.device
        smaller = [replace(config, num_embeddings=len(kept[config.feature_names[0]])) for config, _ in tables]
        pruned = type(collection)(tables=smaller, device=device)
        with torch.no_grad():
            for (config, table), (_, pruned_table) in zip(tables, _tables(pruned)):
                rows = torch.from_numpy(kept[config.feature_names[0]]).to(device)
                pruned_table.weight.copy_(table.weight.detach()[rows])
        setattr(arch, attribute, pruned.requires_grad_(False))
    sizes = {config.feature_names[0]: config.num_embeddings for config in configs}
    # every feature of a table is remapped by the table's kept rows: a list sharing a column's table as that column
    owner = {feature: config.feature_names[0] for config in configs for feature in config.feature_names}
    single = getattr(inference, "single_features", inference.feature_names)  # the columns of sparse_ids
    columns = {i: kept[owner[f]] for i, f in enumerate(single) if owner.get(f) in kept}
    report = {feature: {"rows": sizes[feature], "kept": len(rows), "pruned": sizes[feature] - len(rows)}
              for feature, rows in kept.items()}  # fmt: skip
    # on the tables' device: the export may run where the model was loaded (a GPU), and the remap runs before them
    remap = RowRemap(len(single), columns).to(device)
    list_features = getattr(inference, "list_features", [])
    if not list_features:
        return remap, None, report
    by_list = {i: kept[owner[f]] for i, f in enumerate(list_features) if owner[f] in kept}
    return remap, ListRowRemap(len(list_features), by_list).to(device), report


def prune_dense(tower: nn.Module, share: float) -> Dict[str, int]:
    """Zero ``share`` of each linear layer's weight of ``tower`` by magnitude (in place), leaving plain weights: each
    ``nn.Linear``, and each expert's layer in an ``ExpertBank`` (a slice of its stacked weight, pruned on its own as
    the expert's nn.Linear was); return how many linear layers, weights and zeros there are now."""
    from torchrec_mtl.modules.expert_bank import ExpertBank

    layers = [module for module in tower.modules() if isinstance(module, nn.Linear)]
    for layer in layers:
        prune.l1_unstructured(layer, "weight", amount=share)
        prune.remove(layer, "weight")  # folds the mask into the weight: no weight_orig, no forward hook
    weights = [layer.weight.detach() for layer in layers]
    for bank in (module for module in tower.modules() if isinstance(module, ExpertBank)):
        for weight in bank.expert_weights():  # views: zeroing them zeroes the bank's weights
            weight.mul_(prune.L1Unstructured(share).compute_mask(weight, torch.ones_like(weight)))
            weights.append(weight)
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    return {"layers": len(weights), "weights": sum(weight.numel() for weight in weights), "zeros": zeros}


def prune_for_export(trained: "TrainedModel", pruning: Pruning) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """A pruned copy of ``trained.inference`` (the loaded model is left as it is) with the report the manifest
    records; ``trained.inference`` itself and None when ``pruning`` prunes nothing."""
    if not pruning.active:
        return trained.inference, None
    inference = copy.deepcopy(trained.inference)
    module: nn.Module = inference
    report: Dict[str, Any] = {"rows": None, "dense": None}
    if pruning.rows > 0:
        counts = access_counts(trained) if pruning.by == "count" else None
        scores = counts if counts is not None else row_norms(inference)
        kept = choose_rows(scores, pruning.rows, pruning.scope)
        remap, list_remap, tables = prune_rows(inference, kept)
        if counts is not None:  # what the pruned rows carried in training: the lookups now sent to row 0
            for feature, table in tables.items():
                total, used = int(counts[feature].sum()), int(counts[feature][kept[feature]].sum())
                table["accesses_pruned"] = round(1 - used / total, 6) if total else 0.0
        module = PrunedModel(remap, inference) if list_remap is None else ListPrunedModel(remap, list_remap, inference)
        report["rows"] = {"share": pruning.rows, "by": pruning.by, "scope": pruning.scope, "pruned_ids_go_to_row": 0,
                          "tables": tables}  # fmt: skip
    if pruning.dense > 0:
        report["dense"] = {"share": pruning.dense, "where": "each linear layer weight of the tower (biases kept)",
                           **prune_dense(inference.model.tower, pruning.dense)}  # fmt: skip
    return module.eval(), report
