"""The hostile invocations of tests/test_hostile.py: each a command line (built from the user's folder and a fresh
output folder), the exit code it must end with, a fragment its one-line refusal must hold, and for the logs an
accounting check."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
MIND = ROOT.parent / "shared" / "data" / "mind-small-subset"
SCHEMA = str(ROOT / "configs" / "datasets" / "synthetic.yaml")
CONFIG = str(ROOT / "configs" / "mmoe_synthetic.yaml")
HOSTILE_LOGS, HOSTILE_GZ = 60, 10


def line_count(path: Path) -> int:
    """Lines in a log as a reader counts them: a last line without a line end counts."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@dataclass
class Case:
    name: str
    argv: Callable[[Dict, Path], List[str]]  # (world, a fresh folder for this case's outputs) -> arguments
    expect: int  # the exit code: 0, or 2 for a refusal
    says: str = ""  # a fragment the one-line refusal must hold
    check: Optional[Callable[[Dict, Path, object], None]] = None


def _preprocess_accounts_for_every_line(log: str):
    def check(w: Dict, out: Path, outcome) -> None:
        metadata = json.loads((out / "shards" / "metadata.json").read_text())
        counts = metadata["counts"]
        assert counts["rows_read"] == line_count(w["bad"] / log)
        assert counts["rows_read"] == counts["rows_written"] + counts["rows_rejected"]
        assert sum(counts["rejected_by_reason"].values()) == counts["rows_rejected"]

    return check


def _predict_accounts_for_every_line(log: str):
    def check(w: Dict, out: Path, outcome) -> None:
        summary = json.loads(outcome.err.strip().splitlines()[-1])
        assert summary["lines"] == line_count(w["bad"] / log)
        assert summary["lines"] == summary["scored"] + summary["rejected"]
        assert sum(summary["reasons"].values()) == summary["rejected"]
        scored = (out / "scores.tsv").read_text().splitlines()
        assert len(scored) == 1 + summary["scored"]

    return check


# Where an output may not go, for a command whose output is a folder: (name, path, fragment of the refusal).
def _forbidden_folders(w: Dict) -> List[tuple]:
    return [
        ("the inputs folder", w["inputs"], "input"),
        ("an input file", w["inputs"] / "train.tsv", "input"),
        ("a bystander file", w["inputs"] / "notes.txt", "file"),
        ("under a file", w["inputs"] / "notes.txt" / "sub", "notes.txt"),
        ("a foreign folder", w["foreign"], "did not write"),
        ("the parent of the inputs", w["root"], "input"),
        ("an unwritable place", Path("/proc/no_such/out"), "/proc"),
    ]


def _cases() -> List[Case]:
    cases: List[Case] = []
    add = cases.append
    # ------------------------------------------------------------------------------------------------ no command
    add(Case("no arguments", lambda w, o: [], 2))
    add(Case("unknown command", lambda w, o: ["fly"], 2))
    add(Case("help", lambda w, o: ["--help"], 0))
    # ------------------------------------------------------------------------------------------------ generate
    for rows in ["0", "-5", "abc", "1e3", ""]:
        add(Case(f"generate --rows {rows!r}", lambda w, o, r=rows: ["generate", "--out", str(o / "g"), "--rows", r], 2))
    for seed in ["-1", "x"]:
        add(Case(f"generate --seed {seed}", lambda w, o, s=seed: ["generate", "--out", str(o / "g"), "--seed", s], 2))
    for index in range(7):
        add(Case(f"generate --out forbidden {index}",
                 lambda w, o, i=index: ["generate", "--rows", "50", "--out", str(_forbidden_folders(w)[i][1])], 2,
                 ))  # fmt: skip
    add(Case("generate into an empty folder", lambda w, o: ["generate", "--rows", "60", "--out", str(o)], 0))
    add(Case("generate over an earlier log of its own",
             lambda w, o: ["generate", "--rows", "60", "--out", str(w["root"] / "generated")], 0))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ preprocess

    def prep(w: Dict, o: Path, schema: str = SCHEMA, train: Optional[List[str]] = None, out: Optional[str] = None,
             extra: tuple = ()) -> List[str]:  # fmt: skip
        files = train if train is not None else [str(w["inputs"] / "train.tsv")]
        return ["preprocess", "--schema", schema, "--train", *files, "--out", out or str(o / "shards"), "--quiet",
                *extra]  # fmt: skip

    for name in ["folder", "latin1.yaml", "empty.txt", "list.yaml", "tagged.yaml", "not_yaml.yaml", "binary.bin",
                 "unknown_key.yaml", "absent.yaml"]:  # fmt: skip
        add(Case(f"preprocess --schema {name}", lambda w, o, n=name: prep(w, o, schema=str(w["bad"] / n)), 2))
    for name in ["folder", "absent.tsv", "truncated.tsv.gz", "binary.bin"]:
        add(Case(f"preprocess --train {name}", lambda w, o, n=name: prep(w, o, train=[str(w["bad"] / n)]), 2))
    add(Case("preprocess an empty log", lambda w, o: prep(w, o, train=[str(w["bad"] / "empty.txt")]), 0))
    add(Case("preprocess --test-fraction 1.0", lambda w, o: prep(w, o, extra=("--test-fraction", "1.0")), 2))
    for value in ["nan", "-0.1", "2", "x"]:
        add(Case(f"preprocess --test-fraction {value}", lambda w, o, v=value: prep(w, o, extra=("--test-fraction", v)),
                 2))  # fmt: skip
    for value in ["nan", "-1", "2", "inf"]:
        add(Case(f"preprocess --max-bad-fraction {value}",
                 lambda w, o, v=value: prep(w, o, extra=("--max-bad-fraction", v)), 2))  # fmt: skip
    add(Case("preprocess --split-seed -1", lambda w, o: prep(w, o, extra=("--split-seed", "-1")), 2))
    for index in range(7):
        add(Case(f"preprocess --out forbidden {index}",
                 lambda w, o, i=index: prep(w, o, out=str(_forbidden_folders(w)[i][1])), 2))  # fmt: skip
    add(Case("preprocess into the same --out twice",
             lambda w, o: prep(w, o, out=str(w["root"] / "same_shards")), 0))  # fmt: skip
    add(Case("preprocess into the same --out again",
             lambda w, o: prep(w, o, out=str(w["root"] / "same_shards")), 0))  # fmt: skip
    for log in [f"hostile_{i:02d}.tsv" for i in range(HOSTILE_LOGS)] + [
        f"hostile_{i:02d}.tsv.gz" for i in range(HOSTILE_GZ)
    ]:
        add(Case(f"preprocess {log}",
                 lambda w, o, n=log: prep(w, o, train=[str(w["bad"] / n)], extra=("--max-bad-fraction", "1")), 0,
                 check=_preprocess_accounts_for_every_line(log)))  # fmt: skip
    add(Case("preprocess a hostile log at the default bad-row limit",
             lambda w, o: prep(w, o, train=[str(w["bad"] / "hostile_00.tsv")]), 2, "max_bad_fraction"))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ encode-items

    def enc(w: Dict, o: Path, items: Optional[str] = None, cache: Optional[str] = None, extra: tuple = ()) -> List:
        return ["encode-items", "--items", items or str(w["inputs"] / "items.tsv"), "--cache",
                cache or str(o / "cache.npz"), "--quiet", "--model", str(w["root"] / "no_bert"), *extra]  # fmt: skip

    for name in ["folder", "absent.tsv", "binary.bin", "empty.txt", "latin1.yaml"]:
        add(Case(f"encode-items --items {name}", lambda w, o, n=name: enc(w, o, items=str(w["bad"] / n)), 2))
    for name, path in [("folder", "bad/folder"), ("the items file", "items.tsv"), ("a bystander", "notes.txt")]:
        add(Case(f"encode-items --cache {name}",
                 lambda w, o, p=path: enc(w, o, cache=str(w["inputs"] / p)), 2))  # fmt: skip
    add(Case("encode-items --model absent", lambda w, o: enc(w, o), 2, "--model"))
    add(Case("encode-items with a model", lambda w, o: [*enc(w, o), "--model", str(w["bert"])], 0))
    add(Case("encode-items of duplicate item IDs",
             lambda w, o: [*enc(w, o, items=str(w["bad"] / "duplicate_items.tsv")), "--model", str(w["bert"])], 2,
             "more than once"))  # fmt: skip
    add(Case("encode-items --cache the items file, with a model",
             lambda w, o: [*enc(w, o, cache=str(w["inputs"] / "items.tsv")), "--model", str(w["bert"])], 2))
    for option, value in [("--batch-size", "0"), ("--batch-size", "-1"), ("--threads", "0"), ("--pooling", "max")]:
        add(Case(f"encode-items {option} {value}", lambda w, o, a=option, v=value: enc(w, o, extra=(a, v)), 2))
    # ------------------------------------------------------------------------------------------------ train

    def train(w: Dict, o: Path, *overrides: str, config: str = CONFIG) -> List[str]:
        return ["train", "--config", config, *w["common"], f"out_dir={o / 'run'}", *overrides]

    for name in ["folder", "latin1.yaml", "list.yaml", "tagged.yaml", "self.yaml", "missing_include.yaml",
                 "not_yaml.yaml", "unknown_key.yaml", "absent.yaml", "binary.bin"]:  # fmt: skip
        add(Case(f"train --config {name}", lambda w, o, n=name: train(w, o, config=str(w["bad"] / n)), 2))
    overrides = [
        "training.dense_lr=.nan", "training.dense_lr=nan", "training.embedding_lr=-1", "training.batch_size=0",
        "training.gradient_clip_norm=.nan", "training.collective_timeout_s=.nan", "training.collective_timeout_s=.inf",
        "training.min_lr_ratio=.nan", "training.item_id_dropout=.nan", "data.test_fraction=.nan",
        "data.max_bad_fraction=.nan", "training.epochs=-1", "model.embedding_dim=0", "model.tower.kind=bogus",
        "objective.weighting=bogus", "x=!!python/object/apply:os.system ['echo pwned']", "noequals", "=5",
        "training.batch_size=[1, 2", "training=3", "data.schema=configs/nowhere.yaml", "objective.tasks={}",
        "evaluation.threshold=2", "evaluation.threshold=.nan", "checkpoint.keep=0", "training.tables.C1.lr=.nan",
        "training.batch_size=abc", "training.epochs=1.5", "model.tower.num_experts=0", "model.tower.num_experts=-2",
        "training.seed=x", "data.train=5", "data.train=[]", "objective.tasks.ctr.weight=.nan",
        "objective.tasks.ctr.kind=bogus", "objective.tasks.ctr.label=no_such_label", "training.sharding_types=[bogus]",
        "training.dense_optimizer=bogus", "training.embedding_optimizer=bogus", "training.lr_decay=bogus",
        "checkpoint.every_steps=-1", "checkpoint.every_seconds=.nan", "checkpoint.resume=/no/such/checkpoint",
        "finetune.checkpoint=/no/such/checkpoint", "training.memory_budget_gb=.nan",
    ]  # fmt: skip
    for override in overrides:
        add(Case(f"train {override}", lambda w, o, v=override: train(w, o, v), 2))
    # Adam on CPU needs data-parallel tables (FBGEMM's CPU kernels lack it)
    add(Case("train training.embedding_optimizer=adam training.sharding_types=[row_wise]",
             lambda w, o: train(w, o, "training.embedding_optimizer=adam", "training.sharding_types=[row_wise]"), 2,
             "trains on CPU only in data_parallel tables"))
    add(Case("train data.schema=<a folder>", lambda w, o: train(w, o, f"data.schema={w['bad'] / 'folder'}"), 2))
    add(Case("train data.schema=<latin-1>", lambda w, o: train(w, o, f"data.schema={w['bad'] / 'latin1.yaml'}"), 2))
    add(Case("train data.dir=<absent>", lambda w, o: train(w, o, f"data.dir={w['root'] / 'absent'}"), 2))
    add(Case("train data.train=<no match>", lambda w, o: train(w, o, "data.train=[nothing_*.tsv]"), 2))
    add(Case("train data.shards=<the data folder>",
             lambda w, o: train(w, o, f"data.shards={w['inputs']}"), 2, "input"))  # fmt: skip
    add(Case("train data.shards=<a foreign folder>",
             lambda w, o: train(w, o, f"data.shards={w['foreign']}"), 2, "did not write"))  # fmt: skip
    for index in range(7):
        add(Case(f"train out_dir forbidden {index}",
                 lambda w, o, i=index: train(w, o, f"out_dir={_forbidden_folders(w)[i][1]}"), 2))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ evaluate

    def evaluate(w: Dict, o: Path, checkpoint: Optional[str] = None, *overrides: str, config: str = CONFIG) -> List:
        argv = ["evaluate", "--config", config, *w["common"], f"out_dir={o / 'eval'}"]
        return [*argv, *(["--checkpoint", checkpoint] if checkpoint else []), *overrides]

    add(Case("evaluate the trained checkpoint", lambda w, o: evaluate(w, o, str(w["checkpoint"])), 0))
    for name, path in [("absent", "absent"), ("a file", "inputs/notes.txt"), ("a plain folder", "inputs/bad/folder"),
                       ("a folder of files", "inputs")]:  # fmt: skip
        add(Case(f"evaluate --checkpoint {name}", lambda w, o, p=path: evaluate(w, o, str(w["root"] / p)), 2))
    # evaluate takes the job config from --config: a checkpoint's own copy is not needed
    add(Case("evaluate --checkpoint with no config inside",
             lambda w, o: evaluate(w, o, str(w["root"] / "checkpoint_without_config")), 0))  # fmt: skip
    for name in ["folder", "latin1.yaml", "tagged.yaml", "absent.yaml"]:
        add(Case(f"evaluate --config {name}",
                 lambda w, o, n=name: evaluate(w, o, str(w["checkpoint"]), config=str(w["bad"] / n)), 2))  # fmt: skip
    for index in range(7):
        add(Case(f"evaluate out_dir forbidden {index}",
                 lambda w, o, i=index: evaluate(w, o, str(w["checkpoint"]), f"out_dir={_forbidden_folders(w)[i][1]}"),
                 2))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ predict

    def predict(w: Dict, o: Path, log: Optional[str] = None, out: Optional[str] = None,
                checkpoint: Optional[str] = None) -> List[str]:  # fmt: skip
        return ["predict", "--checkpoint", checkpoint or str(w["checkpoint"]), "--input",
                log or str(w["inputs"] / "test.tsv"), "--out", out or str(o / "scores.tsv"), "--quiet"]  # fmt: skip

    for name, path in [("absent", "absent"), ("a file", "inputs/notes.txt"), ("a plain folder", "inputs/bad/folder"),
                       ("no config inside", "checkpoint_without_config"),
                       ("its data folder gone", "checkpoint_data_gone")]:  # fmt: skip
        add(Case(f"predict --checkpoint {name}",
                 lambda w, o, p=path: predict(w, o, checkpoint=str(w["root"] / p)), 2,
                 "are gone" if path == "checkpoint_data_gone" else ""))  # fmt: skip
    for name in ["folder", "absent.tsv", "truncated.tsv.gz", "binary.bin"]:
        add(Case(f"predict --input {name}", lambda w, o, n=name: predict(w, o, log=str(w["bad"] / n)), 2))
    add(Case("predict an empty log", lambda w, o: predict(w, o, log=str(w["bad"] / "empty.txt")), 0))
    for name, path, says in [
        ("the input itself", "inputs/test.tsv", "input"),
        ("a bystander file", "inputs/notes.txt", "not a file torchrec-mtl wrote"),
        ("a folder", "inputs/bad/folder", "folder"), ("under a file", "inputs/notes.txt/x.tsv", "notes.txt"),
        ("an unwritable place", "/proc/no_such/x.tsv", "/proc"),
    ]:  # fmt: skip
        add(Case(f"predict --out {name}",
                 lambda w, o, p=path: predict(w, o, out=p if p.startswith("/") else str(w["root"] / p)), 2, says))
    add(Case("predict over its own earlier scores",
             lambda w, o: predict(w, o, out=str(w["root"] / "scores_again.tsv")), 0))  # fmt: skip
    add(Case("predict over its own earlier scores, again",
             lambda w, o: predict(w, o, out=str(w["root"] / "scores_again.tsv")), 0))  # fmt: skip
    for i in range(0, HOSTILE_LOGS, 2):
        log = f"hostile_{i:02d}.tsv"
        add(Case(f"predict {log}", lambda w, o, n=log: predict(w, o, log=str(w["bad"] / n)), 0,
                 check=_predict_accounts_for_every_line(log)))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ export

    def export(w: Dict, o: Path, out: Optional[str] = None, checkpoint: Optional[str] = None) -> List[str]:
        return ["export", "--checkpoint", checkpoint or str(w["checkpoint"]), "--out", out or str(o / "export")]

    add(Case("export the trained checkpoint", lambda w, o: export(w, o), 0))
    for index in range(7):
        add(Case(f"export --out forbidden {index}",
                 lambda w, o, i=index: export(w, o, out=str(_forbidden_folders(w)[i][1])), 2))  # fmt: skip
    add(Case("export --out the checkpoint", lambda w, o: export(w, o, out=str(w["checkpoint"])), 2, "input"))
    add(Case("export --out the run folder", lambda w, o: export(w, o, out=str(w["run"])), 2))
    for name, path in [("absent", "absent"), ("a file", "inputs/notes.txt"), ("no config inside",
                                                                               "checkpoint_without_config")]:
        add(Case(f"export --checkpoint {name}",
                 lambda w, o, p=path: export(w, o, checkpoint=str(w["root"] / p)), 2))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ vectors

    def vectors(w: Dict, o: Path, out: Optional[str] = None, checkpoint: Optional[str] = None) -> List[str]:
        return ["vectors", "--checkpoint", checkpoint or str(w["checkpoint"]), "--out", out or str(o / "v"), "--quiet"]

    add(Case("vectors of a model without retrieval", lambda w, o: vectors(w, o), 2, "retrieval"))
    for index in range(7):
        add(Case(f"vectors --out forbidden {index}",
                 lambda w, o, i=index: vectors(w, o, out=str(_forbidden_folders(w)[i][1])), 2))  # fmt: skip
    for name, path in [("absent", "absent"), ("a file", "inputs/notes.txt")]:
        add(Case(f"vectors --checkpoint {name}",
                 lambda w, o, p=path: vectors(w, o, checkpoint=str(w["root"] / p)), 2))  # fmt: skip
    # ------------------------------------------------------------------------------------------------ report
    add(Case("report of the run", lambda w, o: ["report", str(w["run"]), "--out", str(o / "r.html")], 0))
    for name, path in [("absent", "absent"), ("a file", "inputs/notes.txt"), ("a folder without results",
                                                                               "inputs/bad/folder")]:
        add(Case(f"report of {name}", lambda w, o, p=path: ["report", str(w["root"] / p), "--out", str(o / "r.html")],
                 2))  # fmt: skip
    for name, path, says in [
        ("the run's results.json", "run/results.json", "input"), ("a bystander file", "inputs/notes.txt", "not a file"),
        ("a folder", "inputs/bad/folder", "folder"), ("under a file", "inputs/notes.txt/r.html", "notes.txt"),
    ]:  # fmt: skip
        add(Case(f"report --out {name}", lambda w, o, p=path: ["report", str(w["run"]), "--out", str(w["root"] / p)],
                 2, says))  # fmt: skip
    add(Case("benchmark (the benchmarks are scripts in tools/, not a command)", lambda w, o: ["benchmark"], 2))
    # ------------------------------------------------------------------------------------------------ convert
    add(Case("convert an unknown dataset", lambda w, o: ["convert", "netflix", "--source", "x", "--out", str(o)], 2))
    add(Case("convert movielens --source absent",
             lambda w, o: ["convert", "movielens", "--source", str(w["root"] / "absent"), "--out", str(o / "c")], 2,
             "no such folder"))  # fmt: skip
    add(Case("convert mind --source a folder of something else",
             lambda w, o: ["convert", "mind", "--source", str(w["bad"]), "--out", str(o / "c")], 2, "behaviors.tsv"))
    add(Case("convert mind --test-fraction 1", lambda w, o: ["convert", "mind", "--source", str(w["bad"]), "--out",
                                                             str(o / "c"), "--test-fraction", "1"], 2))  # fmt: skip
    for index in range(7):
        add(Case(f"convert --out forbidden {index}",
                 lambda w, o, i=index: ["convert", "mind", "--source", str(MIND if MIND.is_dir() else w["bad"]),
                                        "--out", str(_forbidden_folders(w)[i][1])], 2))  # fmt: skip
    return cases



CASES = _cases()
