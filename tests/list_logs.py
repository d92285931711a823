"""Logs with list columns for the tests, written as real files: the synthetic log with two list columns appended.

- ``history``: the user's clicked items (C2 tokens) before the row, in file order (train, then test), the most
  recent last, ``|``-separated; the schema keeps the last ``max_length`` and looks them up in C2's table (mean).
- ``tags``: the item's category (C3) and brand (C6) tokens and, on one row in five, the device (C5),
  ``,``-separated; hashed into a table of its own and sum-pooled.
- ``hist_category`` (with ``categories=True``, for sequence features): the category (C3) of each item of
  ``history``, position by position, looked up in C3's table.

``scores_as_trained``: a trained model's scores of a file's rows through the training path (preprocessing, the
training loader, the model's forward), what the serving paths are held to.

Example::

    >>> schema_path = write_list_log(small_log, tmp_path / "lists")  # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import Deque, Dict, List, Tuple

import numpy as np
import polars as pl
import torch
import yaml

from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.preprocess import preprocess
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.schema import DatasetSchema

HISTORY_KEPT = 12  # clicked items written per row; more than the schema's max_length, so some rows are truncated
LIST_SCHEMA = {
    "history": {"separator": "|", "max_length": 8, "keep": "last", "pooling": "mean", "shares": "C2"},
    "tags": {"separator": ",", "max_length": 3, "pooling": "sum"},
}


def list_schema(max_length: int = 8, keep: str = "last", categories: bool = False) -> Dict:
    """The synthetic schema with the ``history`` and ``tags`` list columns (a dict, as its YAML reads), and
    ``hist_category`` with ``categories``."""
    raw = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "configs" / "datasets" / "synthetic.yaml"))
    raw["name"] = "synthetic_lists"
    raw["categorical"] = [*raw["categorical"], "history", "tags", *(["hist_category"] if categories else [])]
    raw["lists"] = {**LIST_SCHEMA, "history": {**LIST_SCHEMA["history"], "max_length": max_length, "keep": keep}}
    if categories:
        raw["lists"]["hist_category"] = {**raw["lists"]["history"], "shares": "C3"}
    raw["feature_vocabulary"] = {"tags": {"hash_size": 1000}}
    return raw


def _with_lists(
    frame: pl.DataFrame, histories: Dict[str, Deque[Tuple[str, str]]], seed: int, categories: bool = False
) -> pl.DataFrame:
    """``frame`` (one split, in file order) with ``history`` and ``tags`` (and ``hist_category``); ``histories``
    (each user's clicked (item, category) pairs) carries on across splits."""
    history: List[str] = []
    hist_category: List[str] = []
    for user, item, category, click in zip(
        frame["C1"].to_list(), frame["C2"].to_list(), frame["C3"].to_list(), frame["click"].to_list()
    ):
        history.append("|".join(clicked for clicked, _ in histories[user]))
        hist_category.append("|".join(of for _, of in histories[user]))
        if click == "1":  # read as text
            histories[user].append((item, category))
    device_too = np.random.default_rng(seed).random(frame.height) < 0.2
    tags = [
        ",".join([category, brand, *([device] if extra else [])])
        for category, brand, device, extra in zip(frame["C3"], frame["C6"], frame["C5"], device_too)
    ]
    frame = frame.with_columns(pl.Series("history", history), pl.Series("tags", tags))
    return frame.with_columns(pl.Series("hist_category", hist_category)) if categories else frame


def write_list_log(
    source: Path, out: Path, max_length: int = 8, keep: str = "last", categories: bool = False
) -> Path:
    """``source``'s synthetic ``train.tsv`` and ``test.tsv`` with the list columns (``categories``: and
    ``hist_category``), and their schema, into ``out``; returns the schema's path."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list_schema()["categorical"][:-2]
    names = ["click", "conversion", "rating", *[f"I{k}" for k in range(1, 14)], *columns]
    histories: Dict[str, Deque[Tuple[str, str]]] = defaultdict(lambda: deque(maxlen=HISTORY_KEPT))
    for seed, split in enumerate(("train", "test")):
        frame = pl.read_csv(
            source / f"{split}.tsv", separator="\t", has_header=False, new_columns=names, infer_schema=False,
            quote_char=None,
        )  # fmt: skip
        _with_lists(frame, histories, seed, categories).write_csv(
            out / f"{split}.tsv", separator="\t", include_header=False, null_value="", quote_style="never"
        )
    schema_path = out / "schema.yaml"
    schema_path.write_text(yaml.safe_dump(list_schema(max_length, keep, categories), sort_keys=False))
    return schema_path


def scores_as_trained(trained, data: Path, path: Path, tmp_path: Path) -> Tuple[Dict[str, np.ndarray], EncodedLog]:
    """The trained model's scores of ``path``'s accepted rows through the training path: preprocessed beside the
    run's training file (so with its vocabularies), batched by the training loader, the model's forward."""
    schema = DatasetSchema.from_yaml(trained.config.data.schema)
    shards = tmp_path / "shards"
    preprocess(schema, {"train": [data / "train.tsv"], "test": [path]}, shards, max_bad_fraction=1.0, progress=False)
    for vocabulary in (shards / "vocab").iterdir():  # the run's vocabularies, rebuilt from the same training file
        assert np.array_equal(np.load(vocabulary), np.load(data / "shards" / "vocab" / vocabulary.name))
    test = ShardedLog.open(shards).split("test")
    rows = sum(len(shard) for shard in test)
    (batch,) = BatchLoader(test, trained.inputs["features"], rows, shuffle=False, pad_tail=True)
    with torch.no_grad():
        inference = trained.inference
        scores = inference.outputs(inference.model(batch.dense_features, batch.sparse_features))
    return {name: value.numpy() for name, value in scores.items()}, EncodedLog.concat(test)


def assert_predict_scores(scores_path: Path, lines: int, rejected, truth: Dict[str, np.ndarray]) -> None:
    """``torchrec-mtl predict``'s scores file holds every line of ``1..lines`` but the ``rejected`` ones, each task's
    score the training path's (``truth``, from ``scores_as_trained``) to the six digits it writes."""
    scored = np.loadtxt(scores_path, skiprows=1, delimiter="\t")
    names = scores_path.read_text().split("\n", 1)[0].split("\t")[1:]
    assert scored[:, 0].tolist() == [n for n in range(1, lines + 1) if n not in rejected]
    for i, name in enumerate(names):
        np.testing.assert_allclose(scored[:, 1 + i], truth[name], rtol=2e-5, atol=1e-7)
