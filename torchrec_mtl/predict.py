"""Score a log with a trained model: each line checked and encoded as in training, one prediction per task per row.

The log has the training schema's layout (labels included: their values are read, checked and ignored); the
categorical values go through the training run's own encoding (hashing, or the vocabularies preprocessing saved
beside the shards), and the item text, when the model has it, through the run's items file. Every line is scored
or rejected with the preprocessing reasons (torchrec_mtl.data.preprocess); the output is a TSV with the input's
line number and one column per task (probabilities; values for regression tasks).

Example::

    >>> trained = load_trained("runs/main/checkpoints")  # doctest: +SKIP
    >>> predict_file(trained, "runs/data/synthetic/test.tsv", "runs/main/predictions.tsv")  # doctest: +SKIP
    {'lines': 600000, 'scored': 600000, 'rejected': 0}
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, Optional, TextIO, Tuple

import numpy as np
import torch
from tqdm import tqdm

from torchrec_mtl.data.preprocess import ChunkParser, _tokens_to_rows, read_chunks
from torchrec_mtl.data.prepare import shards_dir
from torchrec_mtl.inference import TrainedModel
from torchrec_mtl.schema import DatasetSchema

CHUNK_BYTES = 8 << 20


class _Encoder:
    """The training run's encoding of a line's features: dense transform, hashed rows, vocabulary rows, text rows."""

    def __init__(self, trained: TrainedModel) -> None:
        config = trained.config
        self.schema = DatasetSchema.from_yaml(config.data.schema)
        if self.schema.header:
            raise ValueError(f"{config.data.schema}: predict reads headerless logs (the schema's columns)")
        self.parser = ChunkParser(self.schema, self.schema.file_columns or self.schema.columns)
        vocab = shards_dir(config.data) / "vocab"
        self.vocabularies = [
            (self.schema.categorical.index(f), np.load(vocab / f"{f}.npy"))
            for f in self.schema.categorical
            if not self.schema.vocabulary_rule(f).is_hash
        ]
        self.text_rows = None
        if trained.inputs["item_text"] is not None:
            from torchrec_mtl.text.table import ItemTextTable

            text = config.model.text
            table = ItemTextTable.load(
                Path(config.data.dir) / text.items, Path(config.data.dir) / text.cache, self.schema.categorical_format
            )
            key = self.schema.key_columns.index(self.schema.item_text_key)
            self.text_rows = lambda keys: table.rows(keys[:, key])

    def encode(self, chunk: bytes, first_line: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(line numbers, dense, sparse ids, rejections) of a chunk of whole lines."""
        parsed = self.parser.parse(chunk, first_line)
        sparse = parsed.sparse.astype(np.int64)
        for t, (column, vocabulary) in enumerate(self.vocabularies):
            sparse[:, column] = _tokens_to_rows(parsed.tokens[:, t], vocabulary)
        if self.text_rows is not None:
            sparse = np.concatenate([sparse, self.text_rows(parsed.keys)[:, None]], axis=1)
        return parsed.line_numbers, parsed.dense, sparse, parsed.rejections


def predict_lines(
    trained: TrainedModel, path: str | Path, batch_size: int = 8192
) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray], list]]:
    """For each chunk of ``path`` ("-": stdin): its scored lines' numbers, each task's predictions, its rejections."""
    encoder = _Encoder(trained)
    model = trained.inference
    with torch.no_grad():
        for chunk, first_line in _chunks(Path("/dev/stdin") if str(path) == "-" else Path(path)):
            lines, dense, sparse, rejections = encoder.encode(chunk, first_line)
            outputs: Dict[str, list] = {}
            for start in range(0, len(lines), batch_size):
                part = model(torch.from_numpy(dense[start : start + batch_size]),
                             torch.from_numpy(sparse[start : start + batch_size]))  # fmt: skip
                for name, values in part.items():
                    outputs.setdefault(name, []).append(values.numpy())
            yield lines, {name: np.concatenate(values) for name, values in outputs.items()}, rejections


def _chunks(path: Path) -> Iterator[Tuple[bytes, int]]:
    """Chunks of whole lines with the number of their first line (a leading UTF-8 byte order mark dropped)."""
    next_line = 1
    for chunk, _ in read_chunks(path, CHUNK_BYTES):
        if next_line == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
        yield chunk, next_line
        next_line += chunk.count(b"\n")


def predict_file(
    trained: TrainedModel, path: str | Path, out: Optional[str | Path] = None, progress: bool = True
) -> Dict[str, object]:
    """Score every line of ``path`` into ``out`` (TSV; None or "-": stdout); returns the counts and the rejection
    reasons (lines read = scored + rejected)."""
    handle: TextIO = sys.stdout if out in (None, "-") else open(out, "w")
    counts = {"lines": 0, "scored": 0, "rejected": 0}
    reasons: Counter = Counter()
    names = list(trained.task_kinds)
    try:
        handle.write("\t".join(["line", *names]) + "\n")
        with tqdm(desc=f"scoring {path}", unit="row", disable=not progress, file=sys.stderr) as bar:
            for lines, outputs, rejections in predict_lines(trained, path):
                for i, line in enumerate(lines):
                    handle.write("\t".join([str(int(line)), *(f"{outputs[n][i]:.6g}" for n in names)]) + "\n")
                for _, reason, column, value, _ in rejections:
                    reasons[reason] += 1
                counts["scored"] += len(lines)
                counts["rejected"] += len(rejections)
                bar.update(len(lines) + len(rejections))
    finally:
        if handle is not sys.stdout:
            handle.close()
    counts["lines"] = counts["scored"] + counts["rejected"]
    return {**counts, "reasons": dict(reasons)}
