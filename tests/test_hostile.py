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
from typing import Dict, List, Optional

import numpy as np
import pytest

from hostile_cases import CASES, CONFIG, HOSTILE_GZ, HOSTILE_LOGS, ROOT
from torchrec_mtl.cli import EXIT_BUG, main
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.train.checkpoint import MANIFEST, TRAIN_STATE, write_manifest
from conftest import ONE_PASS

TINY = SyntheticConfig(num_rows=6_000, num_users=120, num_items=80, num_brands=20, num_sessions=300, seed=5)
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
    common = [f"data.dir={inputs}", "data.generate=null", *ONE_PASS, "model.text=null", f"out_dir={run}",
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
