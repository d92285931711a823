"""Ensembles of checkpoints: ``torchrec-mtl evaluate`` and ``predict`` given ``--checkpoint`` more than once score
with every member and average their predictions per task.

How predictions combine (``mean_predictions``): each task's predictions are averaged over the members, each member
weighing the same (a checkpoint given twice counts twice): probabilities for binary tasks, values for regression
tasks, scores for a retrieval task. A product (ESMM's CTCVR = CTR x CVR) averages the members' product
probabilities, as any other binary output: every member's CTCVR is its own probability of the same event, so their
mean is one too, with the same metrics; it is not the product of the averaged CTR and CVR, from which it can differ.
A NaN from any member leaves the row NaN: a row one member cannot score stays invalid.

Members must agree before anything is scored (``check_members``): the same dataset schema (by content, wherever
its file lies), the same task names and kinds, and the same data (the data folder, its shards and the train/test
split); for evaluate also the same ``evaluation.threshold``, and with ``best_f1`` the same validation rows. Their
models may differ in anything else (architecture, sizes, seeds, steps).

Example::

    >>> members = [(path, load_config(raw=read_train_state(path)["config"])) for path in paths]  # doctest: +SKIP
    >>> check_members(members, evaluation=True)  # doctest: +SKIP
    >>> mean_predictions([{"ctr": np.array([0.2, 0.4])}, {"ctr": np.array([0.4, np.nan])}])
    {'ctr': array([0.3, nan])}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from torchrec_mtl.config import JobConfig, task_set
from torchrec_mtl.errors import EnsembleError
from torchrec_mtl.schema import DatasetSchema


def _data(config: JobConfig) -> Dict[str, Any]:
    """What decides the rows and the encoding a model was trained and tested on (predict reads the vocabularies of
    the shards folder, evaluate its test rows)."""
    data = config.data
    shards = Path(data.shards) if data.shards else Path(data.dir) / "shards"
    split = {"test_fraction": data.test_fraction, "split_seed": data.split_seed, "test": list(data.test)}
    return {"dir": str(Path(data.dir).resolve()), "shards": str(shards.resolve()), "train": list(data.train), **split}


def _validation_rows(config: JobConfig) -> Dict[str, Any]:
    """What decides the validation rows: files of their own, or a share of the train rows drawn with the seed."""
    data = config.data
    drawn = data.validation_fraction > 0
    return {"validation_fraction": data.validation_fraction, "validation": list(data.validation),
            **({"training.seed": config.training.seed} if drawn else {})}  # fmt: skip


def _identity(config: JobConfig, evaluation: bool) -> Dict[str, Tuple[Any, str]]:
    """What members must share, each as (value compared, text shown when it differs)."""
    schema = DatasetSchema.from_yaml(config.data.schema)  # compared by content: its file's path is not compared
    kinds = dict(task_set(config.objective).names)
    data = _data(config)
    identity = {
        "dataset schema": (schema, f"data.schema {config.data.schema}"),
        "tasks": (kinds, str(kinds)),
        "data": (data, str(data)),
    }
    if evaluation:
        threshold = config.evaluation.threshold
        identity["evaluation.threshold"] = (threshold, str(threshold))
        if threshold == "best_f1":  # each task's threshold is chosen on the members' averaged validation scores
            rows = _validation_rows(config)
            identity["validation rows (evaluation.threshold best_f1)"] = (rows, str(rows))
    return identity


def check_members(members: Sequence[Tuple[str | Path, JobConfig]], evaluation: bool) -> None:
    """EnsembleError naming the first member (checkpoint, config) that differs from the first one in its dataset
    schema, its tasks or its data (with ``evaluation``: also its evaluation threshold, and its validation rows when
    that is ``best_f1``); nothing when they all agree."""
    first_path, first = members[0]
    reference = _identity(first, evaluation)
    for path, config in members[1:]:
        for what, (value, shown) in _identity(config, evaluation).items():
            expected, expected_shown = reference[what]
            if value != expected:
                # the same text shown for other values: a schema file that changed since one member was trained
                difference = f"{shown} vs {expected_shown}" if shown != expected_shown else f"{shown}, changed since"
                raise EnsembleError(
                    f"--checkpoint {path}: other {what} than the first member's ({first_path}): {difference}; an "
                    "ensemble averages models of one schema, tasks and data"
                )


def mean_predictions(members: Sequence[Mapping[str, np.ndarray]], names: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Each of ``names`` (default: the first member's keys) averaged over the members, in float64; a NaN in any
    member stays NaN. With one member, its values exactly."""
    keys: List[str] = list(names) or list(members[0])
    return {key: np.mean(np.stack([np.asarray(m[key], dtype=np.float64) for m in members]), axis=0) for key in keys}
