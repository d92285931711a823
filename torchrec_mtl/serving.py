"""``serve.pt``: the exported model behind the training run's own encoding of raw log rows, in one TorchScript file.

``export`` (torchrec_mtl.inference) writes it beside ``model.pt``: a ``RawRowEncoder`` (the rules of
torchrec_mtl.data.preprocess, the run's vocabularies as sorted tensors, the item-text rows of its items file)
composed with the scripted model. It loads with only torch and fbgemm_gpu, and reads rows as predict reads them::

    import torch, fbgemm_gpu  # noqa: F401  (registers the table operators)
    serve = torch.jit.load("runs/main/export/serve.pt")
    scores = serve([["3", "", "12", ..., "00ecd93f", "d7decfb3", ...]])  # the feature fields, manifest's order
    scores = serve.score_lines(["0\\t0\\t\\t13\\t5\\t...", ...], True)  # whole lines; False: without the labels
    scores["valid"], scores["ctr"], scores["ctcvr"], scores["rating"]  # [B] bool, [B] float32 (NaN: not valid)

``forward(rows: List[List[str]])``: each row holds the raw fields of the schema's feature columns, in the file
order (labels and ignored columns left out; ``manifest.json`` lists them under ``serve.columns``).
``score_lines(lines: List[str], labelled: bool)``: each line split by the schema's separator in the training layout
(``labelled``: with the label columns, checked when filled; else without them), one trailing ``\\n`` and ``\\r``
dropped, short rows padded where the schema says so. Both return ``valid`` [B] bool and each task's scores [B]
float32; a row predict rejects is ``valid == False`` and its scores are NaN.

List columns (the schema's ``lists``) are raw fields too, as in the log: split at the list's separator, each element
read as a token of its column (``parse_list``, the rule of preprocessing: an empty field is an empty list, an empty
element or one that is no token makes the row not valid, the elements cut off are checked too), cut to the list's
first or last ``max_length``, then hashed or looked up in the vocabulary it uses (its own, or the column's it
shares). ``ListServingModel`` passes them to the model as one KeyedJaggedTensor's values and lengths
(torchrec_mtl.inference.ListInferenceModel); the encoder's ``encode_rows`` and ``encode_lines_with_lists`` return
them beside the dense and sparse inputs. A sequence model's histories (model.sequence) are such lists; they are
aligned position by position, so a row that keeps another number of elements of one of them than of the first is
not valid (``aligned``; predict rejects it as "sequence lengths differ").

The encoding is predict's to the bit; so are the scores when the rows come in predict's batches (the model's float32
kernels may round a last bit differently at another batch size). Where TorchScript cannot follow polars exactly, the
row is not valid rather than scored differently (``NOT_VALID_HERE`` in torchrec_mtl.data.preprocess.fields, and the
manifest, list them). What predict decides per file is the caller's here: a header row, a byte order mark and a
line with an inner ``\\n`` are not read.
"""

# No "from __future__ import annotations": TorchScript reads the class attributes' annotations as types.
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Final, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from torchrec_mtl.data.preprocess.fields import (
    NOT_VALID_HERE,
    finite_in_float32,
    label_ok,
    parse_decimal,
    parse_list,
    parse_number,
    parse_token,
)
from torchrec_mtl.schema import DatasetSchema

if TYPE_CHECKING:
    from torchrec_mtl.inference import TrainedModel


class RawRowEncoder(nn.Module):
    """Raw string fields -> (valid [B] bool, dense [B, num_dense] float32, sparse [B, num_sparse] int64), the model
    inputs predict's encoder (torchrec_mtl.predict) gives the same rows. Scriptable.

    ``vocabularies``: the sorted tokens of each ``min_count`` feature; ``item_keys``/``item_rows``: the item-text
    table's sorted raw keys and their rows (torchrec_mtl.text.table.ItemTextTable), when the model has item text;
    ``aligned``: the list columns a sequence model attends over, a row keeping different lengths of them not valid.

    >>> encoder = torch.jit.script(RawRowEncoder(schema, vocabularies))  # doctest: +SKIP
    >>> valid, dense, sparse = encoder.encode_lines(["0\\t1\\t4.5\\t3\\t..."], True)  # doctest: +SKIP
    """

    # What a field is (``kinds``, ``layouts``); class constants: TorchScript reads no module-level ints.
    INTEGER: Final[int] = 0
    NUMERIC: Final[int] = 1
    CATEGORICAL: Final[int] = 2
    BINARY_LABEL: Final[int] = 3
    REGRESSION_LABEL: Final[int] = 4
    IGNORED: Final[int] = 5
    LIST: Final[int] = 6

    columns: List[str]
    kinds: List[int]
    slots: List[int]
    hash_sizes: List[int]
    vocabulary_columns: List[int]
    vocabulary_owners: List[int]
    vocabulary_offsets: List[int]
    list_separators: List[str]
    list_max_lengths: List[int]
    list_keep_last: List[bool]
    list_hash_sizes: List[int]
    list_owners: List[int]
    aligned_lists: List[int]
    layouts: List[List[int]]
    last_required: List[int]

    def __init__(
        self,
        schema: DatasetSchema,
        vocabularies: Dict[str, np.ndarray],
        item_keys: Optional[np.ndarray] = None,
        item_rows: Optional[np.ndarray] = None,
        aligned: Sequence[str] = (),
    ) -> None:
        super().__init__()
        single, lists = schema.single_id_columns, schema.list_columns
        kind_of = {**{c: self.INTEGER for c in schema.integer}, **{c: self.NUMERIC for c in schema.numeric},
                   **{c: self.CATEGORICAL for c in single}, **{c: self.LIST for c in lists}}  # fmt: skip
        slot_of = {c: i for group in (schema.integer, schema.numeric, single, lists) for i, c in enumerate(group)}
        self.columns = [c for c in schema.columns if c in kind_of]  # what forward reads, in the file's order
        self.kinds = [kind_of[c] for c in self.columns]
        # dense: the integer features then the numeric ones (schema.dense); sparse: the single-ID columns in
        # schema.categorical's order; lists: the list columns in that order
        self.slots = [slot_of[c] + (len(schema.integer) if kind_of[c] == self.NUMERIC else 0) for c in self.columns]
        self.num_dense, self.num_categorical, self.num_lists = len(schema.dense), len(single), len(lists)
        self.hexadecimal = schema.categorical_format == "hex"
        self.separator, self.pad_short_rows = schema.separator, schema.pad_short_rows
        self.carriage_return = "\r"  # an attribute: TorchScript writes a "\r" in code that it cannot load again
        # the vocabularies, one per owner (a list that shares a column's vocabulary looks its tokens up in it), as
        # sorted tokens side by side in one buffer; a feature names its owner's place
        frequency_columns = [c for c in schema.categorical if not schema.vocabulary_rule(c).is_hash]
        owners = list(dict.fromkeys(schema.vocabulary_owner(c) for c in frequency_columns))
        tokens = [np.asarray(vocabularies[owner], dtype=np.int64) for owner in owners]
        self.register_buffer("vocabulary_tokens", torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *tokens])))
        self.vocabulary_offsets = [int(n) for n in np.cumsum([0, *(len(t) for t in tokens)])]
        # 0: looked up in the vocabulary of ``vocabulary_owners`` at the same place
        self.hash_sizes = [schema.vocabulary_rule(c).hash_size or 0 for c in single]
        frequency = [c for c in single if not schema.vocabulary_rule(c).is_hash]
        self.vocabulary_columns = [single.index(c) for c in frequency]
        self.vocabulary_owners = [owners.index(c) for c in frequency]  # a single-ID column owns its vocabulary
        specs = [schema.lists[c] for c in lists]
        self.list_separators = [spec.separator for spec in specs]
        self.list_max_lengths = [spec.max_length for spec in specs]
        self.list_keep_last = [spec.keep == "last" for spec in specs]
        self.list_hash_sizes = [schema.vocabulary_rule(c).hash_size or 0 for c in lists]
        # -1: hashed; else the place of the vocabulary the list's tokens go through (its own, or the shared one)
        self.list_owners = [-1 if schema.vocabulary_rule(c).is_hash else owners.index(schema.vocabulary_owner(c))
                            for c in lists]  # fmt: skip
        # the lists a sequence model attends over (aligned position by position), by their place among the lists
        self.aligned_lists = [lists.index(c) for c in aligned]
        self.has_item_text = item_keys is not None
        keys = np.zeros(0, np.int64) if item_keys is None else np.asarray(item_keys, np.int64)
        rows = np.zeros(0, np.int64) if item_rows is None else np.asarray(item_rows, np.int64)
        self.register_buffer("item_keys", torch.from_numpy(keys))
        self.register_buffer("item_rows", torch.from_numpy(rows))
        self.item_key_column = single.index(schema.item_text_key) if self.has_item_text else -1
        # score_lines' layouts: [0] with the label columns, [1] without; per field its kind, or -1 - its feature index
        self.layouts, self.last_required = [], []
        for labelled in (True, False):
            layout = [c for c in schema.columns if labelled or c not in schema.labels]
            self.layouts.append([_field_kind(schema, self.columns, c) for c in layout])
            # padding may only supply categorical fields (as ChunkParser): every label and dense field must be there
            required = [i for i, c in enumerate(layout) if c in [*schema.labels, *schema.dense]]
            self.last_required.append(max(required, default=-1))

    def forward(self, rows: List[List[str]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows``: the raw fields of ``columns`` per row; a row of another length is not valid. A schema with list
        columns: ``encode_rows``, which returns them too."""
        valid, dense, sparse, _, _ = self.encode_rows(rows)
        return valid, dense, sparse

    @torch.jit.export
    def encode_lines(self, lines: List[str], labelled: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole lines of the training layout, with (``labelled``) or without the label columns."""
        valid, dense, sparse, _, _ = self.encode_lines_with_lists(lines, labelled)
        return valid, dense, sparse

    @torch.jit.export
    def encode_rows(
        self, rows: List[List[str]]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` with the lists: (valid, dense, sparse, list_values [N] int64, list_lengths [lists, B] int32),
        the lists as ListInferenceModel takes them (torchrec_mtl.inference)."""
        return self._encode(rows, [len(fields) == len(self.columns) for fields in rows])

    @torch.jit.export
    def encode_lines_with_lists(
        self, lines: List[str], labelled: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode_lines`` with the lists, as ``encode_rows``."""
        layout = self.layouts[0 if labelled else 1]
        rows: List[List[str]] = []
        checked: List[bool] = []
        for line in lines:
            fields = self._split(line, layout, self.last_required[0 if labelled else 1])
            features = [""] * len(self.columns)
            ok = len(fields) == len(layout)
            for i in range(len(fields) if ok else 0):
                kind = layout[i]
                if kind < 0:
                    features[-1 - kind] = fields[i]
                elif (kind == self.BINARY_LABEL or kind == self.REGRESSION_LABEL) and fields[i] != "":
                    # a label that is there is checked (as predict does), an empty one is no problem
                    ok = ok and label_ok(fields[i], kind == self.BINARY_LABEL)
            rows.append(features)
            checked.append(ok)
        return self._encode(rows, checked)

    def _split(self, line: str, layout: List[int], last_required: int) -> List[str]:
        """The fields of a line as predict's reader splits them; [] for a line it rejects by its field count."""
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith(self.carriage_return):  # one CR before the line end is part of it, as predict reads files
            line = line[:-1]
        if line == "" or "\n" in line:  # an empty line; an inner \n would be two lines to predict
            return []
        fields = line.split(self.separator)
        if len(fields) < len(layout) and self.pad_short_rows and len(fields) > last_required:
            fields = fields + [""] * (len(layout) - len(fields))
        return fields if len(fields) == len(layout) else []

    def _encode(
        self, rows: List[List[str]], checked: List[bool]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the feature fields of each row; a row whose ``checked`` is False (its line's shape or labels) is
        not valid whatever its fields."""
        valid: List[bool] = []
        dense: List[float] = []
        tokens: List[int] = []
        # per list: its kept tokens of every row, row after row, and each row's length
        list_tokens, list_lengths = self._no_lists(), self._no_lists()
        for fields, ok in zip(rows, checked):
            row_dense = [0.0] * self.num_dense
            row_tokens = [-1] * self.num_categorical  # -1: empty (no valid token is negative), as preprocessing
            row_lists = self._no_lists()
            ok = ok and self._read(fields, row_dense, row_tokens, row_lists)
            kept = [self._kept(row_lists[index], index) for index in range(self.num_lists)]
            ok = ok and self._aligned(kept)
            valid.append(ok)
            # a row that is not valid is encoded as an all-empty one (scored, then masked by the caller)
            dense.extend(row_dense if ok else [0.0] * self.num_dense)
            tokens.extend(row_tokens if ok else [-1] * self.num_categorical)
            if not ok:  # its lists empty, as the rest of it
                kept = self._no_lists()
            for index in range(self.num_lists):
                list_tokens[index].extend(kept[index])
                list_lengths[index].append(len(kept[index]))
        count = len(rows)
        # float64 -> float32 once for the batch: the rounding polars' cast to the shards' float32 does
        dense_tensor = torch.tensor(dense, dtype=torch.float64).reshape(count, self.num_dense).to(torch.float32)
        token_tensor = torch.tensor(tokens, dtype=torch.int64).reshape(count, self.num_categorical)
        values = [self._list_rows(torch.tensor(list_tokens[i], dtype=torch.int64), i) for i in range(self.num_lists)]
        lengths = torch.tensor(list_lengths, dtype=torch.int32).reshape(self.num_lists, count)
        values_tensor = torch.cat(values) if len(values) > 0 else torch.zeros(0, dtype=torch.int64)
        return torch.tensor(valid, dtype=torch.bool), dense_tensor, self._rows(token_tensor), values_tensor, lengths

    def _no_lists(self) -> List[List[int]]:
        """One empty list of ints per list column (TorchScript types ``[[] for ...]`` as a list of tensors)."""
        lists: List[List[int]] = []
        for _ in range(self.num_lists):
            empty: List[int] = []
            lists.append(empty)
        return lists

    def _kept(self, tokens: List[int], index: int) -> List[int]:
        """A list's tokens as preprocessing keeps them: its first or last ``max_length`` (every one was checked)."""
        limit = self.list_max_lengths[index]
        if len(tokens) <= limit:
            return tokens
        return tokens[len(tokens) - limit :] if self.list_keep_last[index] else tokens[:limit]

    def _aligned(self, kept: List[List[int]]) -> bool:
        """Whether a row keeps as many elements of each aligned list (a sequence model's; predict rejects the others
        as "sequence lengths differ")."""
        for index in self.aligned_lists:
            if len(kept[index]) != len(kept[self.aligned_lists[0]]):
                return False
        return True

    def _list_rows(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """A list's kept tokens -> table rows: hashed as its column's rule says, or looked up in the vocabulary it
        uses (its own, or the column's it shares)."""
        size = self.list_hash_sizes[index]
        if size > 0:
            return 1 + torch.remainder(tokens, size - 1)
        owner = self.list_owners[index]
        vocabulary = self.vocabulary_tokens[self.vocabulary_offsets[owner] : self.vocabulary_offsets[owner + 1]]
        return _lookup(vocabulary, torch.arange(1, vocabulary.numel() + 1), tokens)

    def _read(self, fields: List[str], dense: List[float], tokens: List[int], lists: List[List[int]]) -> bool:
        """Fill one row's dense values (float64, cast to float32 with the batch), tokens and lists' tokens (all of
        them: truncation follows); False when a field is not what its column reads."""
        for column in range(len(fields)):
            text, kind, slot = fields[column], self.kinds[column], self.slots[column]
            if text == "":
                continue  # empty: 0 for the dense features (log1p(0) = 0), row 0 for the categorical ones, no tokens
            if kind == self.INTEGER:
                ok, value = parse_decimal(text)
                if not ok:
                    return False
                # glibc's log1p per value, as polars computes it (torch.log1p's vectorised one differs by an ulp)
                dense[slot] = math.log1p(float(max(value, 0)))
            elif kind == self.NUMERIC:
                status, number = parse_number(text)
                if status == 0 or not finite_in_float32(number):
                    return False
                dense[slot] = number
            elif kind == self.LIST:
                status, elements = parse_list(text, self.list_separators[slot], self.hexadecimal)
                if status != 0:  # an empty element or one that is no token: preprocessing rejects the row
                    return False
                lists[slot] = elements
            else:
                ok, value = parse_token(text, self.hexadecimal)
                if not ok:
                    return False
                tokens[slot] = value
        return True

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw tokens [B, categorical] -> embedding rows (hashed or looked up), with the item-text row appended."""
        by_column = tokens.t().contiguous()  # searchsorted wants contiguous keys
        rows = torch.zeros_like(by_column)
        for column, size in enumerate(self.hash_sizes):
            if size > 0:  # 1 + token % (hash_size - 1), row 0 for an empty field
                hashed = 1 + torch.remainder(by_column[column], size - 1)
                rows[column] = torch.where(by_column[column] < 0, 0, hashed)
        for i, column in enumerate(self.vocabulary_columns):
            owner = self.vocabulary_owners[i]
            vocabulary = self.vocabulary_tokens[self.vocabulary_offsets[owner] : self.vocabulary_offsets[owner + 1]]
            rows[column] = _lookup(vocabulary, torch.arange(1, vocabulary.numel() + 1), by_column[column])
        if self.has_item_text:
            text_rows = _lookup(self.item_keys, self.item_rows, by_column[self.item_key_column])
            rows = torch.cat([rows, text_rows[None, :]], dim=0)
        return rows.t().contiguous()


def _field_kind(schema: DatasetSchema, features: List[str], column: str) -> int:
    """A layout's field: a label's kind, IGNORED, or -1 - the feature's index in ``features``."""
    if column in schema.labels:
        return RawRowEncoder.BINARY_LABEL if schema.labels[column].kind == "binary" else RawRowEncoder.REGRESSION_LABEL
    return -1 - features.index(column) if column in features else RawRowEncoder.IGNORED


def _lookup(sorted_keys: torch.Tensor, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``values`` at each key's position in ``sorted_keys``; 0 for a key not there (as vocab.tokens_to_rows and
    ItemTextTable.rows)."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys)
    position = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[position] == keys, values[position].to(torch.int64), 0)


class ServingModel(nn.Module):
    """Raw rows -> {"valid": [B] bool, each task: [B] float32, NaN where not valid}: ``encoder`` then ``model`` (an
    InferenceModel, scripted or not; rows not valid are scored as all-empty rows, then masked). Scriptable.

    >>> serve = torch.jit.script(ServingModel(encoder, scripted, ["ctr", "ctcvr"], trained.device))  # doctest: +SKIP
    >>> serve.score_lines(lines, False)["ctr"]  # doctest: +SKIP
    """

    tasks: List[str]

    def __init__(self, encoder: RawRowEncoder, model: nn.Module, tasks: List[str], device: torch.device) -> None:
        super().__init__()
        self.encoder, self.model, self.tasks = encoder, model, list(tasks)
        # raw strings are parsed on the host; the encoded rows go where the model is (its export device)
        self.register_buffer("model_device", torch.zeros(0, device=device), persistent=False)

    def forward(self, rows: List[List[str]]) -> Dict[str, torch.Tensor]:
        """``rows``: per row the raw fields of ``encoder.columns`` (the manifest's ``serve.columns``)."""
        valid, dense, sparse, list_values, list_lengths = self.encoder.encode_rows(rows)
        return self._score(valid, dense, sparse, list_values, list_lengths)

    @torch.jit.export
    def score_lines(self, lines: List[str], labelled: bool) -> Dict[str, torch.Tensor]:
        """Whole lines of the training layout, with (``labelled``) or without the label columns."""
        valid, dense, sparse, list_values, list_lengths = self.encoder.encode_lines_with_lists(lines, labelled)
        return self._score(valid, dense, sparse, list_values, list_lengths)

    def _score(
        self, valid: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor, list_values: torch.Tensor,
        list_lengths: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:  # fmt: skip
        scores: Dict[str, torch.Tensor] = {}
        if valid.numel() == 0:  # nothing to run the tables on
            for name in self.tasks:
                scores[name] = torch.zeros(0)
        else:
            device = self.model_device.device
            outputs = self._run(dense.to(device), sparse.to(device), list_values.to(device), list_lengths.to(device))
            for name in self.tasks:
                scores[name] = torch.where(valid.to(device), outputs[name], float("nan")).cpu()
        scores["valid"] = valid
        return scores

    def _run(
        self, dense: torch.Tensor, sparse: torch.Tensor, list_values: torch.Tensor, list_lengths: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """The model on encoded rows: one ID per feature (InferenceModel; the schema has no lists)."""
        return self.model(dense, sparse)


class ListServingModel(ServingModel):
    """ServingModel around a model with list features (ListInferenceModel, torchrec_mtl.inference), which takes the
    encoder's lists as a KeyedJaggedTensor's values and lengths. Scriptable."""

    def _run(
        self, dense: torch.Tensor, sparse: torch.Tensor, list_values: torch.Tensor, list_lengths: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        return self.model(dense, sparse, list_values, list_lengths)


@dataclass
class ServingArtifact:
    """The scripted ServingModel of a trained run, the manifest's ``serve`` section, and what it was built from (the
    run's vocabularies and items file: no export may be written over them)."""

    module: torch.jit.ScriptModule
    manifest: Dict[str, object]
    sources: List[Path]


def serving_artifact(trained: "TrainedModel", model: nn.Module) -> ServingArtifact:
    """serve.pt for ``trained`` around ``model`` (its scripted, possibly quantized, InferenceModel), with the encoding
    predict uses: its vocabularies and item-text table, read through predict's own encoder.

    >>> serving = serving_artifact(load_trained("runs/main/checkpoints"), scripted)  # doctest: +SKIP
    >>> serving.module.score_lines(lines, False)["valid"]  # doctest: +SKIP
    """
    from torchrec_mtl.data.prepare import shards_dir
    from torchrec_mtl.predict import _Encoder  # predict imports inference, which imports this module when exporting

    tasks = list(trained.task_kinds)
    if "valid" in tasks:
        raise ValueError("a task named 'valid' would hide serve.pt's 'valid' output; rename the task")
    encoding = _Encoder(trained)  # reads the run's vocabularies and items file, or says they are gone
    schema, table, data = encoding.schema, encoding.text_table, trained.config.data
    vocabularies = encoding.vocabulary_of  # per min_count feature, a list's being the column's it shares
    items = (table.sorted_keys, table.sorted_rows) if table else (None, None)
    encoder = RawRowEncoder(schema, vocabularies, *items, aligned=trained.sequences)
    manifest = {
        "file": "serve.pt",
        "load": "import torch, fbgemm_gpu; serve = torch.jit.load('serve.pt')",
        "forward": "serve(rows: List[List[str]]) -> Dict[str, Tensor]: per row the raw fields of `columns`",
        "columns": encoder.columns,
        "score_lines": f"serve.score_lines(lines: List[str], labelled: bool) -> Dict[str, Tensor]: lines split by "
        f"{schema.separator!r}, laid out as `labelled_layout` (labelled=True) or `unlabelled_layout` (False)",
        "labelled_layout": schema.columns,
        "unlabelled_layout": [c for c in schema.columns if c not in schema.labels],
        "outputs": {"valid": "bool [B]: False for a row predict rejects", **{
            name: "float32 [B], NaN where not valid" for name in tasks}},  # fmt: skip
        "not_read": ["a header row (lay the fields out as the layouts say)", "a byte order mark",
                     "a line holding a line feed", *NOT_VALID_HERE],  # fmt: skip
    }
    sources = [shards_dir(data) / "vocab"] if vocabularies else []
    if table is not None:
        sources.append(Path(data.dir) / trained.config.model.text.items)
    if schema.list_columns:
        manifest["lists"] = {
            name: {"separator": spec.separator, "max_length": spec.max_length, "keep": spec.keep,
                   "rule": "an empty field is an empty list; every element is a token of the column's format, "
                           "hashed or looked up as its column (or the one it shares); the longer lists are cut to "
                           "their first or last max_length (keep)"}
            for name, spec in ((c, schema.lists[c]) for c in schema.list_columns)
        }  # fmt: skip
        for name in trained.sequences:
            manifest["lists"][name]["attended"] = (
                f"a sequence feature (model.sequence), aligned position by position with {trained.sequences}: a row "
                f"that keeps another number of elements of one of them is not valid (predict: sequence lengths differ)"
            )
    serving = (ListServingModel if trained.lists else ServingModel)(encoder, model, tasks, trained.device)
    return ServingArtifact(torch.jit.script(serving), manifest, sources)
