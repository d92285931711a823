"""tools/bench_peers.py: its ratios come from the raw figures it reports, and its smoke run, as a user runs it (its own
process), reports every figure of ours. The peers need their own venv (tools/peers-requirements.txt), which CI does
not have: their smoke run is skipped unless TORCHREC_MTL_PEERS_VENV names one."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
KEYS = ("trainer", "step", "scale_trainer", "scale_step")
RATIOS = {"trainer": "trainer_over_fastest_peer", "step": "step_over_fastest_peer",
          "scale_trainer": "scale_over_fastest_peer", "scale_step": "scale_step_over_fastest_peer"}  # fmt: skip
OURS = {"trainer": ("ours", "ours_no_diagnostics", "ours_dot", "ours_peers_recipe"), "step": ("ours",),
        "scale_trainer": ("ours",),
        "scale_step": ("ours",)}  # fmt: skip


def _tool():
    sys.path.insert(0, str(TOOLS))  # the tool imports its parts and common from beside it
    return importlib.import_module("bench_peers")


def _record(name: str, mode: str, part: str, rate: float, rss: int, round_: int, auc: float = 0.0) -> dict:
    record = {"contender": name, "mode": mode, "part": part, "samples_per_s": rate, "peak_rss_bytes": rss,
              "round": round_}  # fmt: skip
    if auc:
        record["test_auc"] = {"ctr": auc, "cvr": auc - 0.1, "ctcvr": auc + 0.1}
    return record


def test_the_ratios_and_the_diagnostics_cost_come_from_the_median_rates():
    tool = _tool()
    records = []
    for round_, noise in enumerate((1.0, 1.1, 0.9)):
        records += [
            _record("ours", "trainer", "workload", 1000 * noise, 3 << 30, round_, auc=0.75),
            _record("ours_no_diagnostics", "trainer", "workload", 1250 * noise, 3 << 30, round_),
            _record("ours_peers_recipe", "trainer", "workload", 300 * noise, 3 << 30, round_, auc=0.72),
            _record("deepctr_torch", "trainer", "workload", 100 * noise, 5 << 30, round_, auc=0.70),
            _record("torch_rechub", "trainer", "workload", 200 * noise, 4 << 30, round_, auc=0.72),
            _record("ours", "step", "workload", 4000 * noise, 2 << 30, round_),
            _record("torch_rechub", "step", "workload", 1000 * noise, 2 << 30, round_),
            _record("ours", "trainer", "scale", 800 * noise, 3 << 30, round_),
            _record("deepctr_torch", "trainer", "scale", 10 * noise, 10 << 30, round_),
        ]
    records.append({**_record("torch_rechub", "trainer", "scale", 0, 0, 0), "error": "killed"})  # not counted
    summary = tool.summarise(records, None)
    assert summary["samples_per_s"]["trainer"] == {"ours": 1000, "ours_no_diagnostics": 1250,
                                                   "ours_peers_recipe": 300, "deepctr_torch": 100,
                                                   "torch_rechub": 200}  # fmt: skip
    assert summary["trainer_over_fastest_peer"] == 5.0 and summary["fastest_peer"]["trainer"] == "torch_rechub"
    assert summary["peers_recipe_over_fastest_peer"] == 1.5
    assert summary["step_over_fastest_peer"] == 4.0
    assert summary["scale_over_fastest_peer"] == 80.0 and summary["fastest_peer"]["scale_trainer"] == "deepctr_torch"
    assert summary["scale_step_over_fastest_peer"] is None  # no peer stepped at scale
    assert summary["diagnostics_cost"] == pytest.approx(0.2)
    assert summary["peak_rss_gib"]["scale_trainer"] == {"ours": 3.0, "deepctr_torch": 10.0}
    assert summary["test_auc"]["ours"] == {"ctr": 0.75, "cvr": 0.65, "ctcvr": 0.85}
    assert summary["test_auc_std"]["ours"] == {"ctr": 0.0, "cvr": 0.0, "ctcvr": 0.0}  # the same AUC every round
    assert summary["per_round_over_fastest_peer"]["trainer"] == [5.0, 5.0, 5.0]


def _smoke(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench_peers.json"
    command = [sys.executable, str(TOOLS / "bench_peers.py"), "--smoke", "--work", str(tmp_path / "work"),
               "--out", str(out), *extra]  # fmt: skip
    subprocess.run(command, check=True, cwd=TOOLS.parent)
    return json.loads(out.read_text())


def _check_ours(result: dict) -> None:
    """Every figure of ours is there, positive and finite; diagnostics_cost is computed from the trainer rates."""
    for key, names in OURS.items():
        for name in names:
            for figure in ("samples_per_s", "peak_rss_bytes"):
                value = result[figure][key][name]
                assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (figure, key, name)
    rates = result["samples_per_s"]["trainer"]
    assert result["diagnostics_cost_trainers"] == pytest.approx(1 - rates["ours"] / rates["ours_no_diagnostics"],
                                                                abs=1e-4)  # fmt: skip
    lock_step = result["diagnostics_lock_step"]  # the headline figure: tools/bench_diagnostics.py's
    assert result["diagnostics_cost"] == lock_step["diagnostics_cost"] and math.isfinite(result["diagnostics_cost"])
    for name in OURS["trainer"]:
        assert set(result["test_auc"][name]) == {"ctr", "cvr", "ctcvr"}
    assert result["config"]["interaction"] == "concat" and result["config"]["smoke"]
    # ours: 4 trainers and a step at the workload, a trainer and a step at scale; each peer: both, at both
    assert len(result["runs"]) == 7 + (8 if result["peers_skipped"] is None else 0)
    assert not any("error" in run for run in result["runs"])


def test_the_smoke_run_reports_every_figure_of_ours_and_says_why_the_peers_are_missing(tmp_path):
    result = _smoke(tmp_path, "--no-peers")
    _check_ours(result)
    assert all(result[ratio] is None for ratio in RATIOS.values())
    assert "--no-peers" in result["peers_skipped"]


@pytest.mark.skipif(not os.environ.get("TORCHREC_MTL_PEERS_VENV"),
                    reason="no peers' venv: set TORCHREC_MTL_PEERS_VENV to one made from tools/peers-requirements.txt "
                    "(tools/compare_peers.py's ensure_peer_venv makes runs/peers/venv)")  # fmt: skip
def test_the_smoke_run_with_the_peers_divides_ours_by_the_fastest_peer(tmp_path):
    result = _smoke(tmp_path, "--venv", os.environ["TORCHREC_MTL_PEERS_VENV"])
    _check_ours(result)
    for key, ratio in RATIOS.items():
        rates = result["samples_per_s"][key]
        fastest = max(rates[peer] for peer in ("deepctr_torch", "torch_rechub"))
        assert result[ratio] == pytest.approx(rates["ours"] / fastest, abs=5e-4), ratio  # rounded to 3 places
        assert result["peak_rss_bytes"][key]["deepctr_torch"] > 0 and result["peak_rss_bytes"][key]["torch_rechub"] > 0
    for peer in ("deepctr_torch", "torch_rechub"):
        assert set(result["test_auc"][peer]) == {"ctr", "cvr", "ctcvr"}
