#!/usr/bin/env python3
"""A learnable ceiling for what a behaviour history adds: two logistic regressions fit on the same rows of a
converted log, one without the history and one with it.

Why: when a sequence model (DIN) and the same model without histories both score near chance, the question is
whether the data let a history help at all. A well-specified simple model fit on exactly the same rows answers it:
if a plain logistic regression gains nothing from the history either, the data do not carry the signal; if it
gains, the sequence model leaves it on the table.

The models (sklearn LogisticRegression, L2, liblinear, on sparse one-hot features; a value not seen in training
gets an all-zero column; an empty field is the value "" or an empty list):

- ``no_history``: one-hot of each ``--single`` column;
- ``history``: the same plus, for each ``--lists`` column, its bag (multi-hot over the training vocabulary, each
  row L1-normalised), and for each ``--query-pairs`` ``candidate:list`` pair the simple analogue of target
  attention: log1p(how often the row's candidate value occurs in its list) and the candidate value crossed with
  each list element, hashed into 2^20 buckets (the row's crosses L1-normalised like a bag).

C is chosen from :data:`C_GRID` by AUC on a seeded tenth of the training rows (whole impressions when the log has an
``impression`` column), then refit on every training row; the test AUC is that refit's. Writes a JSON list of rows
``{dataset_dir, model, metric, label, validation_auc, test_auc, C, rows_train, rows_validation, rows_test}``.

    .venv/bin/python tools/history_ceiling.py --data runs/data/mind --single user news category subcategory hour \\
        --lists hist_news hist_category --query-pairs news:hist_news category:hist_category \\
        --out runs/history_ceiling_mind.json
    .venv/bin/python tools/history_ceiling.py --data runs/data/movielens \\
        --columns $(.venv/bin/python -c 'from torchrec_mtl.data.movielens import COLUMNS; print(*COLUMNS)') \\
        --single user item genre1 year_bucket hour --lists hist_item hist_genre1 \\
        --query-pairs item:hist_item genre1:hist_genre1 --out runs/history_ceiling_movielens.json

(The MovieLens log has no header, hence ``--columns``; MIND's has one.) On two shared cores MIND took about a
minute and MovieLens about 18 minutes; ``--max-train-rows`` fits on a seeded sample of the training rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import normalize

C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
CROSS_BUCKETS = 2**20
VALIDATION_SHARE = 0.1
LIST_SEPARATOR = "|"
Matrices = Tuple[sp.csr_matrix, sp.csr_matrix]  # a feature block's train and test rows


def read_log(path: Path, columns: Optional[Sequence[str]]) -> pl.DataFrame:
    """A tsv as strings, empty fields as ""; ``columns`` names a headerless file's columns."""
    if columns:
        frame = pl.read_csv(path, separator="\t", has_header=False, new_columns=list(columns), infer_schema=False,
                            quote_char=None)  # fmt: skip
    else:
        frame = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    return frame.with_columns(pl.all().fill_null(""))


def encode(values: pl.Series, vocabulary: pl.Series) -> np.ndarray:
    """Each value's index in ``vocabulary``, -1 when absent."""
    return values.replace_strict(vocabulary, np.arange(len(vocabulary)), default=-1, return_dtype=pl.Int64).to_numpy()


def one_hot(train: pl.Series, test: pl.Series) -> Matrices:
    """One column per training value; a test value not seen in training has none (an all-zero row)."""
    vocabulary = train.unique().sort()
    matrices = []
    for values in (train, test):
        codes = encode(values, vocabulary)
        rows = np.flatnonzero(codes >= 0)
        matrices.append(sp.csr_matrix((np.ones(len(rows)), (rows, codes[rows])), shape=(len(values), len(vocabulary))))
    return matrices[0], matrices[1]


def exploded(frame: pl.DataFrame, list_column: str, candidate_column: Optional[str] = None) -> pl.DataFrame:
    """One row per list element: ``row`` (the frame's row), ``element`` and, if asked, the row's ``candidate``."""
    extra = [pl.col(candidate_column).alias("candidate")] if candidate_column else []
    return (
        frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), *extra,
                     pl.col(list_column).str.split(LIST_SEPARATOR).alias("element"))  # fmt: skip
        .explode("element")
        .filter(pl.col("element") != "")
    )


def bag(train: pl.DataFrame, test: pl.DataFrame, list_column: str) -> Matrices:
    """Multi-hot of a list column over its training elements, each row L1-normalised (an empty list: all zero)."""
    elements = [exploded(frame, list_column) for frame in (train, test)]
    vocabulary = elements[0]["element"].unique().sort()
    matrices = []
    for frame, element in zip((train, test), elements):
        codes, rows = encode(element["element"], vocabulary), element["row"].to_numpy()
        seen = codes >= 0
        matrix = sp.csr_matrix((np.ones(seen.sum()), (rows[seen], codes[seen])), shape=(len(frame), len(vocabulary)))
        matrix.data[:] = 1.0  # multi-hot: a repeated element counts once
        matrices.append(normalize(matrix, norm="l1"))
    return matrices[0], matrices[1]


def mix(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a deterministic hash of uint64 keys."""
    z = keys + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def query_pair(train: pl.DataFrame, test: pl.DataFrame, candidate_column: str, list_column: str) -> Matrices:
    """log1p(count of the candidate in the list) and the hashed candidate x element crosses (L1-normalised per row);
    a cross with a value unseen in training (as candidate or element) is left out."""
    elements = [exploded(frame, list_column, candidate_column) for frame in (train, test)]
    vocabulary = pl.concat([train[candidate_column], elements[0]["element"]]).unique().sort()
    matrices = []
    for frame, element in zip((train, test), elements):
        rows = element["row"].to_numpy()
        matches = (element["candidate"] == element["element"]).to_numpy()
        count = np.bincount(rows[matches], minlength=len(frame)).astype(np.float64)
        candidate, member = encode(element["candidate"], vocabulary), encode(element["element"], vocabulary)
        seen = (candidate >= 0) & (member >= 0)
        keys = (candidate[seen].astype(np.uint64) << np.uint64(32)) | member[seen].astype(np.uint64)
        buckets = (mix(keys) % np.uint64(CROSS_BUCKETS)).astype(np.int64)
        crosses = sp.csr_matrix((np.ones(seen.sum()), (rows[seen], buckets)), shape=(len(frame), CROSS_BUCKETS))
        matrices.append(sp.hstack([sp.csr_matrix(np.log1p(count)[:, None]), normalize(crosses, norm="l1")]))
    return matrices[0].tocsr(), matrices[1].tocsr()


def build_features(train: pl.DataFrame, test: pl.DataFrame, single: Sequence[str], lists: Sequence[str],
                   query_pairs: Sequence[Tuple[str, str]]) -> Dict[str, Matrices]:  # fmt: skip
    """The train and test matrices of each model."""
    base = [one_hot(train[column], test[column]) for column in single]
    history = [bag(train, test, column) for column in lists]
    history += [query_pair(train, test, candidate, column) for candidate, column in query_pairs]
    stack = lambda blocks, side: sp.hstack([block[side] for block in blocks], format="csr")  # noqa: E731
    return {
        "no_history": (stack(base, 0), stack(base, 1)),
        "history": (stack(base + history, 0), stack(base + history, 1)),
    }


def validation_mask(train: pl.DataFrame, seed: int) -> np.ndarray:
    """A seeded tenth of the training rows, whole impressions when there is an ``impression`` column."""
    rng = np.random.default_rng(seed)
    if "impression" in train.columns:
        groups = train["impression"].to_numpy()
        unique = np.unique(groups)
        chosen = rng.choice(unique, size=max(1, round(VALIDATION_SHARE * len(unique))), replace=False)
        return np.isin(groups, chosen)
    mask = np.zeros(len(train), dtype=bool)
    mask[rng.choice(len(train), size=max(1, round(VALIDATION_SHARE * len(train))), replace=False)] = True
    return mask


def fit(features: sp.csr_matrix, labels: np.ndarray, C: float) -> LogisticRegression:
    return LogisticRegression(C=C, solver="liblinear", max_iter=1000).fit(features, labels)


def auc(model: LogisticRegression, features: sp.csr_matrix, labels: np.ndarray) -> float:
    return float(roc_auc_score(labels, model.decision_function(features)))


def choose_and_refit(train_x: sp.csr_matrix, train_y: np.ndarray, test_x: sp.csr_matrix, test_y: np.ndarray,
                     validation: np.ndarray, name: str) -> Dict[str, float]:  # fmt: skip
    """C by validation AUC, then the refit on every training row and its test AUC."""
    fit_x, fit_y = train_x[~validation], train_y[~validation]
    valid_x, valid_y = train_x[validation], train_y[validation]
    scores = {}
    for C in C_GRID:
        started = time.perf_counter()
        scores[C] = auc(fit(fit_x, fit_y, C), valid_x, valid_y)
        print(f"  {name} C={C:g}: validation AUC {scores[C]:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    best = max(C_GRID, key=lambda C: scores[C])
    return {"validation_auc": scores[best], "test_auc": auc(fit(train_x, train_y, best), test_x, test_y), "C": best}


def parse_pair(text: str) -> Tuple[str, str]:
    candidate, _, list_column = text.partition(":")
    if not candidate or not list_column:
        raise argparse.ArgumentTypeError(f"expected candidate_column:list_column, got {text!r}")
    return candidate, list_column


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with train.tsv and test.tsv")
    parser.add_argument("--columns", nargs="+", help="the column names of a headerless log (else its header)")
    parser.add_argument("--label", default="click")
    parser.add_argument("--single", nargs="+", required=True, help="categorical columns, one-hot")
    parser.add_argument("--lists", nargs="*", default=[], help="|-separated list columns, as bags")
    parser.add_argument("--query-pairs", nargs="*", type=parse_pair, default=[], help="candidate_column:list_column")
    parser.add_argument("--max-train-rows", type=int, help="fit on a seeded sample of this many training rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)

    train, test = (read_log(args.data / f"{split}.tsv", args.columns) for split in ("train", "test"))
    if args.label not in train.columns:
        parser.error(f"no column {args.label!r} in {args.data / 'train.tsv'}; a headerless log needs --columns")
    if args.max_train_rows and len(train) > args.max_train_rows:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train), args.max_train_rows, replace=False))
        train = train[keep]
    train_y, test_y = (frame[args.label].cast(pl.Float64).cast(pl.Int64).to_numpy() for frame in (train, test))
    features = build_features(train, test, args.single, args.lists, args.query_pairs)
    validation = validation_mask(train, args.seed)
    print(f"{args.data}: {len(train)} training rows ({validation.sum()} for validation), {len(test)} test rows")

    results = []
    for name, (train_x, test_x) in features.items():
        started = time.perf_counter()
        scores = choose_and_refit(train_x, train_y, test_x, test_y, validation, name)
        print(f"  {name}: {train_x.shape[1]} columns, {time.perf_counter() - started:.0f}s")
        results.append({"dataset_dir": str(args.data), "model": name, "metric": "auc", "label": args.label,
                        **scores, "rows_train": len(train), "rows_validation": int(validation.sum()),
                        "rows_test": len(test)})  # fmt: skip

    print(f"\n{'model':<12} {'C':>5} {'validation AUC':>15} {'test AUC':>9}")
    for row in results:
        print(f"{row['model']:<12} {row['C']:>5g} {row['validation_auc']:>15.4f} {row['test_auc']:>9.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
