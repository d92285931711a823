"""What a well-specified simple model learns from a synthetic log's rows: the learnable ceilings beside the Bayes ones.

The Bayes ceiling scores each row by its true probability, which no model trained on the rows can know (a user with
one click in training has a taste only a prior can guess). This fits two models on exactly the features the
generator's click logit is made of, with L2 chosen on a validation share of the training rows, and reports their
test CTR AUC (``ctr``: every row, the click label) and CVR AUC (``cvr``: the clicked rows, the conversion label; the
conversion logit is made of the same terms: half the affinity, the item's conversion appeal, the user's purchase
propensity and price sensitivity times the item's price, which the item and user weights carry):

- ``crosses``: logistic regression over one-hot user, item, category, brand, segment, device, position, hour and
  past-clicks buckets, plus the segment x category, segment x brand and segment x price-band crosses: every term of
  the click logit except a user's own taste;
- ``crosses+fm``: the same plus a rank-8 factorisation of user x (category, brand, price band): the user's own taste
  too, as far as their rows tell it.

    .venv/bin/python tools/learnable_ceiling.py --data runs/data/affinity --out runs/learnable_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import polars as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchrec_mtl.data.synthetic import binary_auc  # noqa: E402

SINGLE = ["C1", "C2", "C3", "C4", "C5", "C6", "I1", "I2", "past_clicks", "band"]
CROSSES = [("C4", "C3"), ("C4", "C6"), ("C4", "band")]
FM_ITEM_SIDE = ["C3", "C6", "band"]
LABELS = {"ctr": "click", "cvr": "conversion"}


def _read(path: Path) -> pl.DataFrame:
    names = ["click", "conversion", "rating", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 9))]
    frame = pl.read_csv(path, separator="\t", has_header=False, new_columns=names, infer_schema=False)
    return frame.with_columns(pl.col("click").cast(pl.Float32), pl.col("I4").cast(pl.Float64),
                              pl.col("I3").cast(pl.Int64, strict=False).fill_null(-1))  # fmt: skip


def _encode(train: pl.DataFrame, test: pl.DataFrame) -> tuple:
    """Each feature's column of row indices into one shared table (train's values; unseen -> the feature's row 0)."""
    edges = np.quantile(train["I4"].to_numpy(), [0.2, 0.4, 0.6, 0.8])
    frames = []
    for frame in (train, test):
        frames.append(frame.with_columns(
            pl.Series("band", np.searchsorted(edges, frame["I4"].to_numpy(), side="right").astype(str)),
            pl.Series("past_clicks", np.minimum(np.log2(frame["I3"].to_numpy() + 2).astype(int), 8).astype(str)),
        ))  # fmt: skip
    columns: Dict[str, List[np.ndarray]] = {}
    offset = 0
    for name in [*SINGLE, *(f"{a}x{b}" for a, b in CROSSES)]:
        parts = name.split("x") if name not in SINGLE else [name]
        keys = [f.select(pl.concat_str([pl.col(p).cast(pl.String) for p in parts], separator="|")).to_series()
                for f in frames]  # fmt: skip
        vocabulary = {value: i + 1 for i, value in enumerate(keys[0].unique().sort().to_list())}
        columns[name] = [np.array([vocabulary.get(v, 0) for v in key.to_list()]) + offset for key in keys]
        offset += len(vocabulary) + 1
    labels = {task: [f[column].cast(pl.Float32).to_numpy() for f in frames] for task, column in LABELS.items()}
    return columns, offset, labels


class Model(nn.Module):
    def __init__(self, rows: int, fm_rows: Dict[str, int], rank: int) -> None:
        super().__init__()
        self.weights = nn.Embedding(rows, 1)
        nn.init.zeros_(self.weights.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        self.factors = nn.Embedding(rows, rank) if fm_rows else None
        if self.factors is not None:
            nn.init.normal_(self.factors.weight, std=0.01)

    def forward(self, ids: torch.Tensor, user: torch.Tensor, item_side: torch.Tensor) -> torch.Tensor:
        logit = self.weights(ids).sum(dim=(1, 2)) + self.bias
        if self.factors is not None:
            logit = logit + (self.factors(user) * self.factors(item_side).sum(dim=1)).sum(dim=1)
        return logit


def _select(columns: Dict[str, List[np.ndarray]], labels: List[np.ndarray], kept: List[np.ndarray]) -> tuple:
    """The columns and labels of the kept rows (train, test)."""
    return {name: [c[k][kept[k]] for k in (0, 1)] for name, c in columns.items()}, [labels[k][kept[k]] for k in (0, 1)]


def fit(columns, rows, labels, fm: bool, l2: float, epochs: int = 3, seed: int = 0) -> Dict[str, float]:
    """Fits on a seeded nine tenths of the training rows; the epoch with the best AUC on the other tenth is kept."""
    torch.manual_seed(seed)
    names = [*SINGLE, *(f"{a}x{b}" for a, b in CROSSES)]
    ids = [torch.from_numpy(np.stack([columns[n][k] for n in names], axis=1)) for k in (0, 1)]
    user = [torch.from_numpy(columns["C1"][k]) for k in (0, 1)]
    item_side = [torch.from_numpy(np.stack([columns[n][k] for n in FM_ITEM_SIDE], axis=1)) for k in (0, 1)]
    y = torch.from_numpy(labels[0])
    order = np.random.default_rng(seed).permutation(len(y))
    held = order[: len(y) // 10]  # validation: a seeded tenth of the training rows
    fitted = order[len(y) // 10:]
    model = Model(rows, {"user": 1} if fm else {}, rank=8)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    scores = {}
    for epoch in range(epochs):
        for start in range(0, len(fitted), 4096):
            batch = torch.from_numpy(fitted[start : start + 4096])
            logit = model(ids[0][batch], user[0][batch], item_side[0][batch])
            used = [model.weights(ids[0][batch])] + ([model.factors(user[0][batch])] if fm else [])
            penalty = l2 * sum(u.pow(2).sum() for u in used) / len(batch)
            loss = loss_fn(logit, y[batch]) + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            v = torch.from_numpy(held)
            scores[epoch] = binary_auc(model(ids[0][v], user[0][v], item_side[0][v]).numpy(), labels[0][held])
            test = binary_auc(model(ids[1], user[1], item_side[1]).numpy(), labels[1])
        scores[f"test_{epoch}"] = test
    best = max(range(epochs), key=lambda e: scores[e])
    return {"validation_auc": scores[best], "test_auc": scores[f"test_{best}"], "epoch": best + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a generated log's folder (train.tsv, test.tsv, meta.json)")
    parser.add_argument("--out", required=True, help="JSON file")
    parser.add_argument("--tasks", nargs="+", choices=sorted(LABELS), default=sorted(LABELS))
    args = parser.parse_args()
    data = Path(args.data)
    columns, rows, labels = _encode(_read(data / "train.tsv"), _read(data / "test.tsv"))
    clicked = [labels["ctr"][k] == 1 for k in (0, 1)]
    on_rows = {"ctr": (columns, labels["ctr"]), "cvr": _select(columns, labels["cvr"], clicked)}
    results = {"bayes_ceilings": json.loads((data / "meta.json").read_text())["ceilings"]}
    for task in args.tasks:
        task_columns, task_labels = on_rows[task]
        results[task] = {}
        for fm in (False, True):
            name = "crosses+fm" if fm else "crosses"
            fits = {l2: fit(task_columns, rows, task_labels, fm, l2) for l2 in (1e-4, 1e-3, 1e-2)}
            l2 = max(fits, key=lambda k: fits[k]["validation_auc"])  # chosen on validation, reported on test
            results[task][name] = {**fits[l2], "l2": l2}
            print(f"{task} {name}: test AUC {fits[l2]['test_auc']:.4f} (l2 {l2}, epoch {fits[l2]['epoch']}, "
                  f"validation {fits[l2]['validation_auc']:.4f}, {len(task_labels[0])} training rows)",
                  flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
