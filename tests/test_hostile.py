"""A hostile user's session: over 300 invocations of every subcommand with arguments and files built to break it.

Each invocation must end with exit 0 or a one-line error and exit 2 (never a traceback, never exit 70, the code of
an error no check foresaw); no file outside the invocation's own outputs may change (the inputs' folder, the shipped
configs and the trained run's checkpoint are hashed before and after); and every line of every log read is either
used or counted as rejected (preprocess's metadata and predict's summary are checked against the files' own line
counts).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest

from torchrec_mtl.cli import EXIT_BUG, main
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.train.checkpoint import MANIFEST, TRAIN_STATE, write_manifest

ROOT = Path(__file__).resolve().parents[1]
MIND = ROOT.parent / "shared" / "data" / "mind-small-subset"
SCHEMA = str(ROOT / "configs" / "datasets" / "synthetic.yaml")
CONFIG = str(ROOT / "configs" / "mmoe_synthetic.yaml")
TINY = SyntheticConfig(num_rows=6_000, num_users=120, num_items=80, num_brands=20, num_sessions=300, seed=5)
HOSTILE_LOGS, HOSTILE_GZ = 60, 10
ADVERSARIAL = ["", "0", "1", "2", "yes", "-1", "nan", "inf", "-inf", "1e39", "1e400", "99999999999999999999", "0x1f",
               "ab12", "ZZ", "+5", "3.5", '"', "\r", "\x00", "\ufeff1", "é", "日本", " 1", "--", "1,2", "a|b"]  # fmt: skip


def generate_into(folder: Path) -> Path:
    generate(TINY, folder)
    return folder


def _digest(folder: Path) -> Dict[str, str]:
    """Every file under ``folder`` with its SHA-256 (the tree as a user would find it)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _line_count(path: Path) -> int:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    raised: Optional[BaseException] = None


def invoke(argv: List[str]) -> Outcome:
    """Run the CLI in this process as a user's shell would (argparse's exit included)."""
    out, err = io.StringIO(), io.StringIO()
    raised = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage errors exit 2, --help exits 0
            code = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException as error:  # noqa: BLE001 (a traceback the user would see: recorded as a failure)
            code, raised = -1, error
    return Outcome(code, out.getvalue(), err.getvalue(), raised)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir):
    """The user's folder: logs, a bystander file, broken files of every kind, and a small trained run."""
    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "inputs"  # the user's own folder: logs copied in by hand, so no marker of ours
    shutil.copytree(generate_into(root / "generated"), inputs)
    (inputs / ".torchrec-mtl.json").unlink()
    (inputs / "notes.txt").write_text("the user's own notes: nothing may touch them\n")
    bad = inputs / "bad"
    bad.mkdir()
    (bad / "folder").mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (bad / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (bad / "list.yaml").write_text("- a\n- b\n")
    (bad / "tagged.yaml").write_text(f"x: !!python/object/apply:os.system ['touch {root}/pwned']\n")
    (bad / "self.yaml").write_text("include: [self.yaml]\n")
    (bad / "missing_include.yaml").write_text("include: [nowhere.yaml]\n")
    (bad / "not_yaml.yaml").write_text("a: [1, 2\n")
    (bad / "unknown_key.yaml").write_text("bogus_section: {}\n")
    good = (inputs / "test.tsv").read_bytes()
    (bad / "truncated.tsv.gz").write_bytes(gzip.compress(good)[:-200])
    (bad / "header_only.tsv").write_text("click\tconversion\trating\n")
    (bad / "duplicate_items.tsv").write_text("item_id\tdescription\nab12\tred shoes\nab12\tblue book\n")
    rng = np.random.default_rng(0)
    lines = good.decode().splitlines()
    for i in range(HOSTILE_LOGS):  # logs of good lines mixed with hostile ones
        rows = []
        for _ in range(60):
            if rng.random() < 0.5:
                rows.append(lines[rng.integers(len(lines))])
            else:
                fields = lines[rng.integers(len(lines))].split("\t")
                for _ in range(rng.integers(1, 4)):
                    fields[rng.integers(len(fields))] = ADVERSARIAL[rng.integers(len(ADVERSARIAL))]
                if rng.random() < 0.15:
                    fields = fields[: rng.integers(len(fields))]
                rows.append("\t".join(fields))
        ending = "\r\n" if i % 5 == 0 else "\n"
        text = ending.join(rows) + (ending if i % 3 else "")
        (bad / f"hostile_{i:02d}.tsv").write_bytes(text.encode("utf-8", errors="surrogatepass"))
        if i < HOSTILE_GZ:
            (bad / f"hostile_{i:02d}.tsv.gz").write_bytes(gzip.compress(text.encode("utf-8", errors="surrogatepass")))
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")

    run = root / "run"
    common = [f"data.dir={inputs}", "data.generate=null", "model.text=null", f"out_dir={run}",
              "training.batch_size=256", "training.progress=false", "training.curve_every=0"]  # fmt: skip
    assert invoke(["train", "--config", CONFIG, *common]).code == 0
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    without_config = root / "checkpoint_without_config"
    shutil.copytree(checkpoint, without_config)
    state = json.loads((without_config / TRAIN_STATE).read_text())
    del state["config"]
    (without_config / TRAIN_STATE).write_text(json.dumps(state))
    (without_config / MANIFEST).unlink()
    write_manifest(without_config)
    data_gone = root / "checkpoint_data_gone"
    shutil.copytree(checkpoint, data_gone)
    state = json.loads((data_gone / TRAIN_STATE).read_text())
    state["config"]["data"]["dir"] = str(root / "deleted_data")
    (data_gone / TRAIN_STATE).write_text(json.dumps(state))
    (data_gone / MANIFEST).unlink()
    write_manifest(data_gone)
    return {
        "root": root, "inputs": inputs, "bad": bad, "foreign": foreign, "run": run, "checkpoint": checkpoint,
        "without_config": without_config, "data_gone": data_gone, "common": common, "bert": tiny_bert_dir,
    }  # fmt: skip


@dataclass
class Case:
    name: str
    argv: Callable[[Dict, Path], List[str]]  # (world, a fresh folder for this case's outputs) -> arguments
    expect: int  # the exit code: 0, or 2 for a refusal
    says: str = ""  # a fragment the one-line refusal must hold
    check: Optional[Callable[[Dict, Path, Outcome], None]] = None


def _preprocess_accounts_for_every_line(log: str):
    def check(w: Dict, out: Path, outcome: Outcome) -> None:
        metadata = json.loads((out / "shards" / "metadata.json").read_text())
        counts = metadata["counts"]
        assert counts["rows_read"] == _line_count(w["bad"] / log)
        assert counts["rows_read"] == counts["rows_written"] + counts["rows_rejected"]
        assert sum(counts["rejected_by_reason"].values()) == counts["rows_rejected"]

    return check


def _predict_accounts_for_every_line(log: str):
    def check(w: Dict, out: Path, outcome: Outcome) -> None:
        summary = json.loads(outcome.err.strip().splitlines()[-1])
        assert summary["lines"] == _line_count(w["bad"] / log)
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
        "training.dense_optimizer=bogus", "training.embedding_optimizer=adam", "training.lr_decay=bogus",
        "checkpoint.every_steps=-1", "checkpoint.every_seconds=.nan", "checkpoint.resume=/no/such/checkpoint",
        "finetune.checkpoint=/no/such/checkpoint", "training.memory_budget_gb=.nan",
    ]  # fmt: skip
    for override in overrides:
        add(Case(f"train {override}", lambda w, o, v=override: train(w, o, v), 2))
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


def test_the_harness_has_at_least_300_invocations_across_every_subcommand():
    assert len(CASES) >= 300, len(CASES)
    commands = {case.name.split()[0] for case in CASES}
    assert {"generate", "preprocess", "encode-items", "convert", "train", "evaluate", "predict", "export",
            "vectors", "report"} <= commands  # fmt: skip


def test_hostile_invocations_end_cleanly_change_nothing_else_and_account_for_every_line(world):
    protected = {"inputs": world["inputs"], "configs": ROOT / "configs", "checkpoint": world["checkpoint"],
                 "foreign": world["foreign"]}  # fmt: skip
    before = {name: _digest(folder) for name, folder in protected.items()}
    failures = []
    for index, case in enumerate(CASES):
        out = world["root"] / "outputs" / f"case_{index:03d}"
        out.mkdir(parents=True)
        outcome = invoke(case.argv(world, out))
        problem = None
        if outcome.raised is not None:
            problem = f"traceback: {type(outcome.raised).__name__}: {outcome.raised}"
        elif "Traceback" in outcome.err or outcome.code == EXIT_BUG:
            problem = f"exit {outcome.code}: {outcome.err.strip()[-300:]}"
        elif outcome.code != case.expect:
            problem = f"exit {outcome.code}, expected {case.expect}: {outcome.err.strip()[-300:]}"
        elif case.expect == 2 and "usage:" not in outcome.err:
            message = [line for line in outcome.err.splitlines() if line.startswith("torchrec-mtl:")]
            if len(message) != 1:
                problem = f"expected one error line, got: {outcome.err.strip()[-300:]}"
            elif case.says and case.says not in message[0]:
                problem = f"the message lacks {case.says!r}: {message[0]}"
        elif case.check is not None:
            try:
                case.check(world, out, outcome)
            except AssertionError as error:
                problem = f"accounting: {error}"
        if problem:
            failures.append(f"{case.name}: {problem}")
    after = {name: _digest(folder) for name, folder in protected.items()}
    changed = [
        f"{name}/{path}" for name in protected for path in set(before[name]) | set(after[name])
        if before[name].get(path) != after[name].get(path)
    ]  # fmt: skip
    assert not (world["root"] / "pwned").exists(), "a YAML tag ran a command"
    assert not changed, f"files changed outside the runs' own outputs: {changed}"
    assert not failures, f"{len(failures)} of {len(CASES)} invocations misbehaved:\n" + "\n".join(failures)
