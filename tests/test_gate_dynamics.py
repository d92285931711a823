"""tools/gate_dynamics.py records every gate's training steps on a real run: the logit moves it reports stay within
Adam's bound, and a higher temperature shrinks the gap the gates reach."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_DATA

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gate_dynamics.py"


def _dynamics(tmp_path: Path, temperature: float) -> dict:
    out = tmp_path / f"t{temperature}.json"
    command = [sys.executable, str(TOOL), "--config", str(REPO / "configs" / "mmoe_ali_ccp.yaml"), "--out", str(out),
               f"model.tower.gate_temperature={temperature}", f"data.shards={tmp_path / 'shards'}"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_the_gates_move_within_adams_bound_and_the_temperature_divides_the_gap(tmp_path: Path) -> None:
    if not (REAL_DATA / "ali-ccp-sample").is_dir():
        pytest.skip(f"{REAL_DATA / 'ali-ccp-sample'} is absent (the shared samples are not redistributed with the repo)")
    cold, warm = _dynamics(tmp_path, 1.0), _dynamics(tmp_path, 4.0)
    assert set(cold["steps"]) == {"gate0", "gate1"}  # ctr and cvr
    for name, steps in cold["steps"].items():
        moves = [s["move"] / s["bound"] for s in steps[1:]]
        assert len(steps) > 3 and all(0 < m <= 1.05 for m in moves), (name, moves)  # the bias adds a little
        assert steps[-1]["spread"] > steps[0]["spread"]  # the gates learn: their logits part
        assert warm["summary"][name]["final_spread"] < cold["summary"][name]["final_spread"] / 2
