"""What a run prints: -v/-q, the rows and positives behind every metric, unreliable AUCs marked."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from torchrec_mtl.cli import _verbosity_overrides, configure_output
from torchrec_mtl.cli_args import build_parser
from torchrec_mtl.report.tables import metrics_table
from torchrec_mtl.results import format_segment, format_table, unreliable
from torchrec_mtl.train.metrics import TaskMetrics


def test_every_command_takes_v_and_q_but_not_both() -> None:
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name, command in commands.items():
        options = {option for action in command._actions for option in action.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= options, name
    for argv in (["train", "--config", "c.yaml"], ["report", "runs/main"], ["predict", "--checkpoint", "c", "--input", "x"]):
        assert parser.parse_args([*argv, "-vv"]).verbose == 2
        assert parser.parse_args([*argv, "-q"]).quiet
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "runs/main", "-v", "-q"])


def test_v_prints_the_whole_plan_and_q_turns_progress_off_unless_a_key_says_otherwise() -> None:
    parser = build_parser()
    assert _verbosity_overrides(parser.parse_args(["train", "--config", "c.yaml", "-v"])) == ["training.print_plan=true"]
    assert _verbosity_overrides(parser.parse_args(["train", "--config", "c.yaml", "-q"])) == ["training.progress=false"]
    assert _verbosity_overrides(parser.parse_args(["train", "--config", "c.yaml"])) == []


def _shown(verbose: int, quiet: bool, module: str) -> int:
    """How many of two identical warnings raised 'from' ``module`` are shown at this verbosity."""
    with warnings.catch_warnings(record=True) as caught:
        configure_output(verbose, quiet)
        for _ in range(2):
            warnings.warn_explicit("a warning", UserWarning, "file.py", 1, module=module)
    return len(caught)


def test_warnings_are_shown_once_library_internals_from_v_on_and_none_with_q() -> None:
    assert _shown(0, False, "torchrec_mtl.run.train") == 1
    assert _shown(0, False, "torchrec.distributed.planner") == 0
    assert _shown(1, False, "torchrec.distributed.planner") == 1
    assert _shown(2, False, "torchrec.distributed.planner") == 2
    assert _shown(0, True, "torchrec_mtl.run.train") == 0


def test_task_metrics_count_each_tasks_labelled_rows_and_positives() -> None:
    metrics = TaskMetrics(
        {"ctr": "binary", "rating": "regression"}, batch_size=4, window_size=16, device=torch.device("cpu"),
        count_rows=True,
    )
    nan = float("nan")
    for _ in range(3):
        metrics.update(
            {"ctr": torch.tensor([0.9, 0.2, 0.4, 0.7]), "rating": torch.tensor([3.0, 4.0, 2.0, 1.0])},
            {"ctr": torch.tensor([1.0, 0.0, nan, 1.0]), "rating": torch.tensor([3.0, nan, nan, 2.0])},
        )
    result = metrics.compute()
    assert (result["ctr"]["rows"], result["ctr"]["positives"]) == (9, 6)
    assert result["rating"]["rows"] == 6 and "positives" not in result["rating"]
    metrics.reset()
    metrics.update({"ctr": torch.tensor([0.5]), "rating": torch.tensor([1.0])}, {"ctr": torch.tensor([0.0]),
                                                                                 "rating": torch.tensor([1.0])})
    assert metrics.compute()["ctr"]["rows"] == 1


def test_an_auc_on_fewer_than_30_positives_or_negatives_is_marked_with_its_counts() -> None:
    reliable = {"auc": 0.76, "ne": 0.88, "rows": 10_000, "positives": 600}
    few = {"auc": 1.0, "ne": 0.5, "rows": 40, "positives": 2}
    assert unreliable(reliable) is None and unreliable({"auc": 0.7}) is None
    assert unreliable(few) == "unreliable AUC: 2 positive and 38 negative rows"
    assert unreliable({"auc": 0.6, "rows": 1_000, "positives": 990}) is not None  # 10 negatives
    table = format_table({"ctr": reliable, "cvr": few, "rating": {"rmse": 0.5, "rows": 600}})
    ctr, cvr, rating = table.splitlines()[1:4]
    assert "10,000" in ctr and "600" in ctr and "unreliable" not in ctr and "rows" not in ctr.split()[-2:]
    assert cvr.endswith("ne 0.5000  (unreliable AUC: 2 positive and 38 negative rows)")
    assert "600" in rating
    segment = format_segment("cold", {"rows": 40, "tasks": {"cvr": few}})
    assert segment == "cold items (40 test rows): cvr auc 1.0000 (40 rows, 2 positives; unreliable)"
    assert "1.0000 (unreliable)" in metrics_table({"cvr": few})


def _run(code: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_version_and_configs_start_without_torch_and_a_missing_torchrec_is_one_line_of_advice(tmp_path) -> None:
    listed = _run("import sys; from torchrec_mtl.cli import main; code = main(['configs']); "
                  "print('torch' in sys.modules, code)")  # fmt: skip
    assert listed.stdout.splitlines()[-1] == "False 0", listed.stderr
    missing = _run("import sys; sys.modules['torchrec'] = None; from torchrec_mtl.cli import main; "
                   "sys.exit(main(['train', '--config', 'nowhere.yaml']))")  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "pip install --no-deps torchrec==1.9.2" in missing.stderr


def test_a_reader_that_goes_away_ends_the_listing_quietly() -> None:
    # the reading end is closed before the command (a second of imports) writes: its first write meets a broken pipe
    child = subprocess.Popen([sys.executable, "-m", "torchrec_mtl.cli", "configs"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    child.stdout.close()
    assert child.wait(timeout=120) == 141 and child.stderr.read() == ""
