#!/usr/bin/env python3
"""One peer's MMoE on rows exported by tools/compare_peers.py: train with early stopping on the validation rows, score
the test rows, write the AUCs as JSON. Runs with the peer venv's python (runs/peers/venv), so it imports only the
peers, torch, numpy and scikit-learn, never torchrec_mtl.

The rows (``--rows`` .npz, written by compare_peers.export_rows) hold, per split (train, validation, test):
``<split>_dense`` [N, D] float32, ``<split>_sparse`` [N, C] int64 (IDs already vocabulary-mapped by our
preprocessing, each below its table size), ``<split>_ctr`` and ``<split>_cvr`` [N] float32 labels (NaN = missing:
the CVR label is present on clicked rows only). The .json beside it (``--meta``) names the features and table sizes
and the settings taken from our config (embedding dimension, experts, towers, batch size, epochs, patience).

Both peers train two heads, CTR on every row and CVR on clicked rows (a masked BCE: the sample space our CVR task
has), with their own optimiser defaults (DeepCTR-Torch: Adam 1e-3 over a summed loss; torch-rechub: MTLTrainer's
Adam 1e-3, weight decay 1e-5, the mean of the task losses). After every epoch the model is scored on the validation
rows by the mean AUC of CTR, CVR (clicked rows) and CTCVR (pCTR x pCVR against click-and-convert, all rows), the score
our ``training.early_stopping={metric: mean_auc}`` uses; the best epoch's weights are kept, and training stops after
``patience`` epochs without a better score or at ``max_epochs``.

Example::

    runs/peers/venv/bin/python tools/peer_runner.py --model deepctr_torch --seed 0 \\
        --rows runs/peers/movielens/rows/seed0.npz --meta runs/peers/movielens/rows/seed0.json \\
        --out runs/peers/movielens/deepctr_torch/seed0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

SPLITS = ("train", "validation", "test")
PEERS = ("deepctr_torch", "torch_rechub")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC over the rows whose label is present; NaN when they hold a single class (tiny samples)."""
    keep = ~np.isnan(labels)
    labels, scores = labels[keep], scores[keep]
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def task_aucs(rows: Dict[str, np.ndarray], p_ctr: np.ndarray, p_cvr: np.ndarray) -> Dict[str, float]:
    """CTR on every row, CVR on clicked rows (its label is NaN elsewhere), CTCVR = pCTR x pCVR on every row.

    Example::

        >>> rows = {"ctr": np.array([0, 1, 1, 0.]), "cvr": np.array([np.nan, 1, 0, np.nan])}
        >>> task_aucs(rows, np.array([.1, .9, .8, .2]), np.array([.5, .6, .4, .5]))["ctcvr"]
        1.0
    """
    ctcvr = np.where(rows["ctr"] == 0, 0.0, np.where(np.isnan(rows["cvr"]), np.nan, rows["cvr"]))
    return {"ctr": auc(rows["ctr"], p_ctr), "cvr": auc(rows["cvr"], p_cvr), "ctcvr": auc(ctcvr, p_ctr * p_cvr)}


def mean_auc(aucs: Dict[str, float]) -> float:
    """The early-stopping score: the mean of the tasks' AUCs that are defined (NaN when none is)."""
    values = [v for v in aucs.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def masked_bce(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BCE over the labels that are present (CVR: clicked rows), element by element (so over [B] or [B, tasks]); 0 for
    a batch without any. DeepCTR-Torch calls it with ``reduction='sum'`` (its convention) on both heads at once,
    torch-rechub per head with the default mean (its BCELoss's).

    Example::

        >>> float(masked_bce(torch.tensor([0.5, 0.9]), torch.tensor([1.0, float("nan")])))  # the NaN row is left out
        0.6931471824645996
    """
    keep = ~torch.isnan(target)
    if not bool(keep.any()):
        return pred.sum() * 0.0
    return F.binary_cross_entropy(pred[keep], target[keep], reduction=reduction)


def load_rows(path: Path) -> Dict[str, Dict[str, np.ndarray]]:
    with np.load(path) as data:
        return {s: {part: data[f"{s}_{part}"] for part in ("dense", "sparse", "ctr", "cvr")} for s in SPLITS}


def feature_names(meta: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """Peer-safe names (module keys must not hold dots, and Ali-CCP's are bare numbers): ``c<i>`` and ``d<i>``."""
    return [f"c{i}" for i in range(len(meta["categorical"]))], [f"d{i}" for i in range(len(meta["dense"]))]


def as_inputs(meta: Dict[str, Any], split: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Feature name -> its column (int64 IDs, float32 values)."""
    sparse_names, dense_names = feature_names(meta)
    inputs = {name: np.ascontiguousarray(split["sparse"][:, i]) for i, name in enumerate(sparse_names)}
    inputs.update({name: np.ascontiguousarray(split["dense"][:, i]) for i, name in enumerate(dense_names)})
    return inputs


class DeepCTRPeer:
    """deepctr_torch.models.MMOE, trained one epoch at a time by its own ``fit``."""

    def __init__(self, meta: Dict[str, Any], seed: int) -> None:
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import MMOE

        sparse_names, dense_names = feature_names(meta)
        columns = [SparseFeat(n, size, embedding_dim=meta["embedding_dim"])
                   for n, size in zip(sparse_names, meta["table_sizes"])]  # fmt: skip
        columns += [DenseFeat(n, 1) for n in dense_names]
        self.model = MMOE(
            columns, num_experts=meta["num_experts"], expert_dnn_hidden_units=tuple(meta["expert_layer_sizes"]),
            gate_dnn_hidden_units=(),  # a linear gate per task, as ours
            tower_dnn_hidden_units=tuple(meta["tower_layer_sizes"]), task_types=("binary", "binary"),
            task_names=("ctr", "cvr"), seed=seed, device="cpu",
        )  # fmt: skip
        # one callable for both heads: its compile takes a list of loss names only, and the NaN mask is per element
        self.model.compile("adam", loss=masked_bce)
        self.meta = meta

    def train_epoch(self, split: Dict[str, np.ndarray]) -> None:
        y = np.stack([split["ctr"], split["cvr"]], axis=1).astype(np.float32)
        self.model.fit(as_inputs(self.meta, split), y, batch_size=self.meta["batch_size"], epochs=1, verbose=0)

    def predict(self, split: Dict[str, np.ndarray]) -> np.ndarray:
        return self.model.predict(as_inputs(self.meta, split), batch_size=self.meta["eval_batch_size"])

    def state(self) -> Dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class Batches:
    """Batches of (feature dict, labels [B, 2]) for torch-rechub's trainer, shuffled by ``generator`` when given:
    the rows are whole arrays already, so slicing beats a per-row Dataset."""

    def __init__(self, inputs: Dict[str, np.ndarray], labels: np.ndarray, batch_size: int,
                 generator: np.random.Generator | None) -> None:  # fmt: skip
        self.inputs = {name: torch.from_numpy(column) for name, column in inputs.items()}
        self.labels, self.batch_size, self.generator = torch.from_numpy(labels), batch_size, generator

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
        n = len(self.labels)
        order = torch.from_numpy(self.generator.permutation(n)) if self.generator is not None else torch.arange(n)
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield {name: column[rows] for name, column in self.inputs.items()}, self.labels[rows]


class RechubPeer:
    """torch_rechub.models.multi_task.MMOE, trained one epoch at a time by its MTLTrainer's ``train_one_epoch``."""

    def __init__(self, meta: Dict[str, Any], seed: int) -> None:
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE
        from torch_rechub.trainers import MTLTrainer

        sparse_names, dense_names = feature_names(meta)
        features = [SparseFeature(n, size, embed_dim=meta["embedding_dim"])
                    for n, size in zip(sparse_names, meta["table_sizes"])]  # fmt: skip
        features += [DenseFeature(n) for n in dense_names]
        tower = {"dims": list(meta["tower_layer_sizes"])}
        self.model = MMOE(
            features, ["classification", "classification"], meta["num_experts"],
            expert_params={"dims": list(meta["expert_layer_sizes"])}, tower_params_list=[tower, dict(tower)],
        )  # fmt: skip
        self.trainer = MTLTrainer(self.model, ["classification", "classification"], device="cpu",
                                  model_path=meta["scratch"])  # fmt: skip
        self.trainer.loss_fns = [masked_bce, masked_bce]  # CVR on clicked rows (the trainer's own: BCE on every row)
        self.meta, self.rng = meta, np.random.default_rng(seed)

    def train_epoch(self, split: Dict[str, np.ndarray]) -> None:
        labels = np.stack([split["ctr"], split["cvr"]], axis=1).astype(np.float32)
        self.trainer.train_one_epoch(Batches(as_inputs(self.meta, split), labels, self.meta["batch_size"], self.rng))

    def predict(self, split: Dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        batches = Batches(as_inputs(self.meta, split), np.zeros((len(split["ctr"]), 2), np.float32),
                          self.meta["eval_batch_size"], None)  # fmt: skip
        with torch.no_grad():
            return torch.cat([self.model(x) for x, _ in batches]).numpy()

    def state(self) -> Dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def run(model: str, rows: Dict[str, Dict[str, np.ndarray]], meta: Dict[str, Any], seed: int,
        log: Callable[[str], None] = print) -> Dict[str, Any]:  # fmt: skip
    """Train ``model`` with early stopping on the validation rows and score the test rows; the result dict."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    start = time.time()
    peer = DeepCTRPeer(meta, seed) if model == "deepctr_torch" else RechubPeer(meta, seed)
    curve: List[Dict[str, Any]] = []
    best, best_state = -1, None
    for epoch in range(meta["max_epochs"]):
        peer.train_epoch(rows["train"])
        p = peer.predict(rows["validation"])
        aucs = task_aucs(rows["validation"], p[:, 0], p[:, 1])
        score = mean_auc(aucs)
        curve.append({"epoch": epoch, "score": score, **aucs, "seconds": round(time.time() - start, 1)})
        log(f"{model} seed {seed} epoch {epoch}: validation mean AUC {score:.4f}")
        # the first epoch, then each that beats the kept one (min_delta 0), as torchrec_mtl.run.selection.best_epoch
        if best < 0 or score > curve[best]["score"]:
            best, best_state = epoch, peer.state()
        elif np.isnan(curve[best]["score"]) and not np.isnan(score):
            best, best_state = epoch, peer.state()
        if epoch - best >= meta["patience"]:
            break
    peer.load(best_state)
    p = peer.predict(rows["test"])
    return {
        "model": model, "seed": seed, "best_epoch": best, "epochs": len(curve), "validation": curve,
        "test": task_aucs(rows["test"], p[:, 0], p[:, 1]), "seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=PEERS)
    parser.add_argument("--rows", required=True, type=Path, help="the .npz of train/validation/test rows")
    parser.add_argument("--meta", required=True, type=Path, help="the .json describing them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in (args.rows, args.meta):
        if not path.exists():
            print(f"error: {path} does not exist (tools/compare_peers.py writes it)", file=sys.stderr)
            return 2
    meta = json.loads(args.meta.read_text())
    meta["scratch"] = str(args.out.parent)  # torch-rechub's trainer wants a model_path; nothing is saved there here
    result = run(args.model, load_rows(args.rows), meta, args.seed, log=lambda line: print(line, flush=True))
    result["settings"] = {key: value for key, value in meta.items() if key != "scratch"}  # what reuse compares
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(args.out)  # a run killed by the time limit leaves no result that looks finished
    print(json.dumps({key: result[key] for key in ("test", "best_epoch", "epochs", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
