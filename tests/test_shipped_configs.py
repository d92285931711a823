"""The Ali-CCP and AliExpress job configs train as shipped on the shared samples, header CSVs and all, and their
tables say how few rows each AUC stands on."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_DATA

REPO = Path(__file__).resolve().parents[1]


def _positives(folder: Path, files: list, label: str) -> int:
    return sum(int(float(row[label])) for name in files for row in csv.DictReader(open(folder / name)))


@pytest.mark.parametrize(
    "config, folder, test_files, conversion",
    [
        ("mmoe_ali_ccp.yaml", "ali-ccp-sample", ["torchrechub_ali_ccp_test_sample.csv"], "purchase"),
        ("mmoe_aliexpress.yaml", "aliexpress-sample",
         ["torchrechub_aliexpress_test_sample.csv", "fuxictr_tiny_mtl_test.csv"], "conversion"),
    ],
)  # fmt: skip
def test_the_header_csv_configs_train_and_count_their_test_positives(
    config: str, folder: str, test_files: list, conversion: str, tmp_path: Path
) -> None:
    if not (REAL_DATA / folder).is_dir():
        pytest.skip(f"{REAL_DATA / folder} is absent (the shared samples are not redistributed with the repo)")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torchrec_mtl.cli", "train", "-q", "--config", str(REPO / "configs" / config),
               f"out_dir={out}", f"data.shards={tmp_path / 'shards'}"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    rows = sum(1 for name in test_files for _ in csv.DictReader(open(REAL_DATA / folder / name)))
    clicks = _positives(REAL_DATA / folder, test_files, "click")
    conversions = _positives(REAL_DATA / folder, test_files, conversion)
    assert (tasks["ctr"]["rows"], tasks["ctr"]["positives"]) == (rows, clicks)
    assert (tasks["cvr"]["rows"], tasks["cvr"]["positives"]) == (clicks, conversions)
    assert (tasks["ctcvr"]["rows"], tasks["ctcvr"]["positives"]) == (rows, conversions)
    assert "unreliable AUC" in result.stdout and "\r" not in result.stdout + result.stderr
