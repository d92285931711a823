"""A trained model out of its checkpoint: unsharded for scoring here, or exported as a TorchScript artifact.

``load_trained`` rebuilds the model a checkpoint holds in one process (no process group: DCP reads the shards
of every rank into whole tables) from what the checkpoint itself records: the job config and the model's inputs
(feature names, table sizes, dense width, regression offsets). ``InferenceModel`` wraps it with plain tensor inputs
and named per-task outputs: probabilities for binary tasks and products (ESMM's CTCVR), values for regression.

``export`` follows torchrec's inference path: ``quantize_inference_model`` (optional: int8 tables, a sequence
model's unpooled ones in its EmbeddingCollection too; the dense layers and the attention stay fp32),
``torchrec.fx.symbolic_trace`` (a sequence model's lookups and attention scripted whole: ``SCRIPTED_WHOLE``),
``torch.jit.script``. It writes two artifacts, which need torch and fbgemm_gpu (whose operators the tables call) to
load, not this package: ``model.pt`` takes encoded inputs, ``serve.pt`` raw log rows, encoded inside as predict
encodes them (torchrec_mtl.serving). ``pruning`` (off by default) drops rarely used embedding rows and zeroes small
tower weights in the exported copy first (torchrec_mtl.pruning); both files keep their inputs::

    import torch, fbgemm_gpu  # noqa: F401  (registers the table operators)
    model = torch.jit.load("runs/main/export/model.pt")
    outputs = model(dense_features, sparse_ids)  # [B, num_dense] float32, [B, num_features] int64 table rows
    outputs["ctr"], outputs["ctcvr"], outputs["rating"]
    # a model with list features (ListInferenceModel): sparse_ids holds the single-ID features only, and the lists
    # come as one KeyedJaggedTensor's values [N] int64 and lengths [lists, B] int32 (manifest.json: inputs); the
    # histories a sequence model attends over (model.sequence) are lists there too
    outputs = model(dense_features, sparse_ids, list_values, list_lengths)
    serve = torch.jit.load("runs/main/export/serve.pt")
    scores = serve.score_lines(lines, False)  # raw lines without the label columns; serve(rows): feature fields
    scores["valid"], scores["ctr"]  # [B] bool (False: a row predict rejects), [B] float32 (NaN where not valid)

Example::

    >>> trained = load_trained("runs/main/checkpoints/step-000002343")  # doctest: +SKIP
    >>> export(trained, "runs/main/export", quantize=False)  # doctest: +SKIP
    >>> export(trained, "runs/main/export_pruned", pruning=Pruning(rows=0.5, by="count"))  # doctest: +SKIP
"""


# No "from __future__ import annotations" here: FX writes the forward signatures' annotations into the traced code,
# and TorchScript must read them as types, not strings.
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mtl.build import build_cached_item_text, build_model
from torchrec_mtl.config import JobConfig, config_from_dict, task_set
from torchrec_mtl.device import DEFAULT_DEVICE
from torchrec_mtl.model import MultiTaskModel
from torchrec_mtl.outputs import new_folder
from torchrec_mtl.pruning import Pruning, prune_for_export
from torchrec_mtl.modules.sequence import InterestArch, SequenceLookups
from torchrec_mtl.modules.two_tower import ITEM_VECTOR, USER_VECTOR
from torchrec_mtl.schema import ListSpec
from torchrec_mtl.tasks import TaskSet
from torchrec_mtl.train.checkpoint import (
    TRAIN_STATE,
    CheckpointError,
    load_tensors,
    read_train_state,
    resolve_checkpoint,
    verify_checkpoint,
)


if TYPE_CHECKING:
    from torchrec_mtl.serving import ServingArtifact

class TaskOutputs(nn.Module):
    """Tower logits -> each evaluated name's prediction, as the objective (torchrec_mtl.tasks) defines it:
    sigmoid for binary tasks, logit + offset for regression, the product of its parts' probabilities for a
    product, the user-item score ``u . v`` for a retrieval task. Scriptable (plain lists and dicts)."""

    def __init__(self, tasks: TaskSet, offsets: Dict[str, float]) -> None:
        super().__init__()
        self.binary: List[str] = [t.name for t in tasks.tasks if t.kind == "binary"]
        self.regression: List[str] = [t.name for t in tasks.tasks if t.kind == "regression"]
        self.offsets: Dict[str, float] = {name: float(offsets.get(name, 0.0)) for name in self.regression}
        self.products: Dict[str, List[str]] = {p.name: list(p.of) for p in tasks.products}
        self.retrieval: List[str] = [t.name for t in tasks.tasks if t.kind == "retrieval"]
        # attributes: TorchScript reads no module-level str
        self.user_vector, self.item_vector = USER_VECTOR, ITEM_VECTOR

    def forward(self, logits: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        outputs: Dict[str, torch.Tensor] = {}
        for name in self.binary:
            outputs[name] = torch.sigmoid(logits[name])
        for name in self.regression:
            outputs[name] = logits[name] + self.offsets[name]
        for name, parts in self.products.items():
            product = torch.ones_like(logits[parts[0]])
            for part in parts:
                product = product * outputs[part]
            outputs[name] = product
        for name in self.retrieval:
            outputs[name] = (logits[self.user_vector] * logits[self.item_vector]).sum(dim=1)
        return outputs


def one_id_per_feature(feature_names: List[str], sparse_ids: torch.Tensor) -> KeyedJaggedTensor:
    """[B, len(feature_names)] table rows, one per feature and row (as preprocessing writes them) -> the model's KJT."""
    return KeyedJaggedTensor(
        keys=feature_names,
        values=sparse_ids.t().reshape(-1),
        lengths=torch.ones(sparse_ids.numel(), dtype=torch.int32, device=sparse_ids.device),
    )


def with_lists(
    single_features: List[str],
    list_features: List[str],
    sparse_ids: torch.Tensor,
    list_values: torch.Tensor,
    list_lengths: torch.Tensor,
) -> KeyedJaggedTensor:
    """The model's KJT of one table row per single-ID feature (``sparse_ids`` [B, len(single_features)]) and the
    list features' own KJT parts: ``list_lengths`` int32 [len(list_features), B] and ``list_values`` int64, the
    rows of list 0 row after row, then of list 1 (torchrec's values order for those keys).

    The single-ID keys come first and the lists after them, whatever the features' order: the tables look their
    features up by key (``KeyedJaggedTensor.to_dict``, and the quantized collection permutes to its own order) and
    ``OrderedSparseArch`` puts the pooled vectors back in feature order, so no data-dependent split of the values
    is needed (FX traces this into plain tensor operations)."""
    return KeyedJaggedTensor(
        keys=single_features + list_features,
        values=torch.cat([sparse_ids.t().reshape(-1), list_values]),
        lengths=torch.cat([
            torch.ones(sparse_ids.numel(), dtype=torch.int32, device=sparse_ids.device),
            list_lengths.reshape(-1).to(torch.int32),
        ]),  # fmt: skip
    )


def list_specs(inputs: Dict[str, Any]) -> Dict[str, ListSpec]:
    """The list features a checkpoint records (``model_inputs["lists"]``; none before lists existed), in feature
    order; sequence features among them."""
    recorded = inputs.get("lists") or {}
    return {name: ListSpec(**recorded[name]) for name in inputs["features"] if name in recorded}


def sequence_features(inputs: Dict[str, Any]) -> List[str]:
    """The list features a checkpoint's model attends over (``model_inputs["sequences"]``, model.sequence; none
    before sequences existed or with kind none), in the order their columns are laid side by side: aligned position
    by position, so each row must keep as many elements of each."""
    return list(inputs.get("sequences") or {})


# Modules that an export scripts whole rather than traces through (torchrec.fx.symbolic_trace's leaf_modules): the
# sequence lookups check the aligned lengths and BST the history's length, branches FX cannot trace on tensor
# values; TorchScript compiles them as they are.
SCRIPTED_WHOLE = [SequenceLookups.__name__, InterestArch.__name__]


class InferenceModel(nn.Module):
    """``forward(dense_features [B, num_dense], sparse_ids [B, num_features])`` -> {task: [B]}: one table row per
    categorical feature (as preprocessing writes them), in ``feature_names`` order."""

    def __init__(self, model: MultiTaskModel, feature_names: List[str], outputs: TaskOutputs) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs
        self.feature_names: List[str] = list(feature_names)

    def forward(self, dense_features: torch.Tensor, sparse_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.outputs(self.model(dense_features, one_id_per_feature(self.feature_names, sparse_ids)))


class ListInferenceModel(nn.Module):
    """A model with pooled list features: ``forward(dense_features [B, num_dense] float32, sparse_ids [B, S] int64,
    list_values [N] int64, list_lengths [L, B] int32)`` -> {task: [B]}. ``sparse_ids``: one table row per single-ID
    feature (``single_features``, the features less the lists, in their order); the lists as one KeyedJaggedTensor's
    values and lengths over the keys ``list_features``: ``list_lengths[l, b]`` is row b's length of list l (0: an
    empty list, pooled to zeros), ``list_values`` list 0's rows one after another, then list 1's, ...
    (``N = list_lengths.sum()``). The rows are table rows as preprocessing writes them: already truncated to the
    list's ``max_length`` (a longer list is refused: the model never saw one) and mapped (hashed or through the
    vocabulary). ``feature_names`` is every feature, lists included, in the model's order.

    A sequence model's histories (model.sequence: looked up unpooled in its EmbeddingCollection and attended over)
    are lists here like any other: the KeyedJaggedTensor goes whole to both collections, each of which reads its own
    features. The sequence features are aligned position by position: a row whose lengths of them differ is refused
    by the model (its sequence lookups' ValueError), as in training."""

    def __init__(
        self, model: MultiTaskModel, feature_names: List[str], lists: Dict[str, ListSpec], outputs: TaskOutputs
    ) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs
        self.feature_names: List[str] = list(feature_names)
        self.list_features: List[str] = [f for f in feature_names if f in lists]
        self.single_features: List[str] = [f for f in feature_names if f not in lists]
        self.max_lengths: List[int] = [lists[f].max_length for f in self.list_features]

    def forward(
        self, dense_features: torch.Tensor, sparse_ids: torch.Tensor, list_values: torch.Tensor,
        list_lengths: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:  # fmt: skip
        check_lists(list_values, list_lengths, self.max_lengths, sparse_ids.size(0))
        features = with_lists(self.single_features, self.list_features, sparse_ids, list_values, list_lengths)
        return self.outputs(self.model(dense_features, features))


@torch.fx.wrap
def check_lists(list_values: torch.Tensor, list_lengths: torch.Tensor, max_lengths: List[int], rows: int) -> None:
    """Refuse list inputs the tables would misread (a wrong shape reads another row's IDs, a length sum that is not
    the values' count reads past them) or that training never gave (a list longer than its max_length). One call in
    the traced graph: FX cannot trace branches on tensor values; TorchScript compiles it as it is."""
    lists = len(max_lengths)
    if list_lengths.dim() != 2 or list_lengths.size(0) != lists or list_lengths.size(1) != rows:
        raise ValueError(
            f"list_lengths: expected shape [{lists}, {rows}] (one row per list feature, one column per row of "
            f"sparse_ids), got {list_lengths.dim()} dimension(s) of sizes {list_lengths.shape}"
        )
    total = int(list_lengths.sum())
    if list_values.dim() != 1 or total != list_values.numel():
        raise ValueError(f"list_values: {list_values.numel()} values; list_lengths sum to {total}")
    for index in range(lists):
        if rows > 0:
            longest, shortest = int(list_lengths[index].max()), int(list_lengths[index].min())
            if longest > max_lengths[index] or shortest < 0:
                raise ValueError(
                    f"list_lengths[{index}]: lengths from {shortest} to {longest}; the list's max_length is "
                    f"{max_lengths[index]} (truncate it as its keep rule says)"
                )


@dataclass
class TrainedModel:
    """What ``load_trained`` rebuilds: the model with its outputs, and what it was trained on."""

    inference: nn.Module  # InferenceModel, or ListInferenceModel for a model with list features
    config: JobConfig
    inputs: Dict[str, Any]  # features, table_sizes, num_dense, dense_features, offsets, item_text, retrieval
    checkpoint: Path
    device: torch.device  # where the weights live; callers bring their inputs there

    @property
    def task_kinds(self) -> Dict[str, str]:
        return dict(task_set(self.config.objective).names)

    @property
    def lists(self) -> Dict[str, ListSpec]:
        """The model's list features (none: ``inference`` is an InferenceModel), in feature order; its sequence
        features among them."""
        return list_specs(self.inputs)

    @property
    def sequences(self) -> List[str]:
        """The list features the model attends over (``sequence_features``; none without model.sequence)."""
        return sequence_features(self.inputs)


def load_trained(checkpoint: str | Path, device: str | torch.device = DEFAULT_DEVICE) -> TrainedModel:
    """The model of ``checkpoint`` (a ``step-N`` folder, or a run's ``checkpoints`` folder: its newest), unsharded,
    in eval mode, on ``device`` (the host by default), in fp32 whatever ``training.precision`` was (the weights are
    fp32; autocast only ever cast copies). The checkpoint is verified against its manifest before any file of it is
    read, and its weights must all be finite (torchrec_mtl.train.checkpoint); otherwise CheckpointError naming the
    file or the parameter."""
    path = resolve_checkpoint(checkpoint)
    verify_checkpoint(path)  # once: the train state below and DCP's files are then what the run wrote
    state = read_train_state(path)
    inputs = state.get("model_inputs")
    if inputs is None:
        raise CheckpointError(f"{path}: records no model inputs (written before they were saved); train again")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path / TRAIN_STATE}: records no job config (the 'config' key); train again")
    config = config_from_dict(state["config"])
    tasks = task_set(config.objective)
    device = torch.device(device)
    item_text = None
    if inputs["item_text"] is not None:
        if config.model.text.online or config.model.text.finetune_layers:
            raise CheckpointError(f"{path}: a model that runs BERT inside (model.text.online) is not exported here")
        text = inputs["item_text"]
        item_text = build_cached_item_text(
            config.model.text, config.model.embedding_dim, text["num_items"], text["dim"], device
        )
    lists = list_specs(inputs)
    # the tables are built on ``device``, the dense layers on the host and moved
    model = build_model(
        config.model, inputs["num_dense"], inputs["table_sizes"], device, tasks.tower_tasks, item_text,
        inputs.get("retrieval"), lists,
    ).to(device)  # fmt: skip
    # the checkpoint's keys are those of MultiTaskTrain (model.*); DCP fills whole tables from every rank's shards
    wanted = {f"model.{key}": value for key, value in model.state_dict().items()}
    # verified above; refuses non-finite weights; loads the expert banks from a checkpoint of the per-expert layout
    load_tensors(path, {"model": wanted}, no_dist=True, verify=False, module=model)
    model.load_state_dict({key.removeprefix("model."): value for key, value in wanted.items()})
    outputs = TaskOutputs(tasks, inputs["offsets"])
    if lists:
        inference: nn.Module = ListInferenceModel(model, inputs["features"], lists, outputs).eval()
    else:
        inference = InferenceModel(model, inputs["features"], outputs).eval()
    return TrainedModel(inference, config, inputs, path, device)


def export(
    trained: TrainedModel, out_dir: str | Path, quantize: bool = False, pruning: Optional[Pruning] = None
) -> Path:
    """Write ``out_dir/model.pt`` (TorchScript, encoded inputs), ``out_dir/serve.pt`` (TorchScript, raw log rows in:
    torchrec_mtl.serving) and ``out_dir/manifest.json`` (inputs, outputs, how to load and call each, what was
    pruned). serve.pt holds the run's vocabularies and item-text rows: the run's data folder must be where training
    left it (as for predict); otherwise a ShardError naming it, before anything is written. ``pruning`` prunes a
    copy of the model before it is quantized (torchrec_mtl.pruning); ``trained`` is left as loaded."""
    import torchrec.fx

    trained.inference.requires_grad_(False)  # an inference artifact: outputs carry no graph
    module, pruned = prune_for_export(trained, pruning or Pruning())
    if quantize:
        from torchrec.inference.modules import quantize_inference_model

        module = quantize_inference_model(module)
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(module, leaf_modules=SCRIPTED_WHOLE))
    from torchrec_mtl.serving import serving_artifact  # imports predict, which imports this module

    serving = serving_artifact(trained, scripted)  # reads the run's vocabularies and items file, or says they are gone
    with new_folder(out_dir, "export", inputs=[trained.checkpoint, *serving.sources]) as out:
        _write_export(out, scripted, serving, trained, quantize, pruned)
    return Path(out_dir) / "model.pt"


def _write_export(
    out: Path,
    scripted: torch.jit.ScriptModule,
    serving: "ServingArtifact",
    trained: TrainedModel,
    quantize: bool,
    pruned: Optional[Dict[str, Any]],
) -> None:
    scripted.save(str(out / "model.pt"))
    serving.module.save(str(out / "serve.pt"))
    inputs = trained.inputs
    lists = trained.lists
    single = [f for f in inputs["features"] if f not in lists]
    call = "model(dense_features, sparse_ids" + (", list_values, list_lengths)" if lists else ")")
    manifest = {
        "inputs": {
            "dense_features": {"shape": ["B", inputs["num_dense"]], "dtype": "float32",
                               "columns": inputs["dense_features"]},
            "sparse_ids": {"shape": ["B", len(single)], "dtype": "int64", "columns": single},
            **({
                "list_values": {"shape": ["N"], "dtype": "int64", "order": "the table rows of list_features[0] for "
                                "row 0, row 1, ..., then of list_features[1], ... (a KeyedJaggedTensor's values)"},
                "list_lengths": {"shape": [len(lists), "B"], "dtype": "int32", "columns": list(lists),
                                 "max_length": {name: spec.max_length for name, spec in lists.items()},
                                 "meaning": "list_lengths[l, b]: row b's length of list l (0: empty, pooled to zeros); "
                                            "N = list_lengths.sum(); lists longer than max_length are refused "
                                            "(cut them by the list's keep rule first, as serve.pt does)"},
                "list_features": list(lists),
                **({"sequence_features": trained.sequences,
                    "sequences": "lists the model attends over (model.sequence), looked up unpooled, "
                                 f"{'int8' if quantize else 'fp32'} tables; aligned position by position: each row "
                                 "must hold as many elements of each (a row that does not is refused)"}
                   if trained.sequences else {}),
            } if lists else {}),
        },  # fmt: skip
        "outputs": trained.task_kinds,
        "quantized": quantize,
        "device": str(trained.device),  # the weights' device; torch.jit.load(..., map_location=...) moves them
        "pruned": pruned,  # None, or per table the rows kept and pruned and the criterion, and the dense sparsity
        "checkpoint": str(trained.checkpoint),
        "load": f"import torch, fbgemm_gpu; model = torch.jit.load('model.pt'); {call}",
        "serve": serving.manifest,  # serve.pt: raw rows in (torchrec_mtl.serving)
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
