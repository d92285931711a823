"""Shared fixtures: a small generated log on disk, and a launcher for multi-process gloo tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from torchrec_mtl.data.synthetic import SyntheticConfig, generate

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = SyntheticConfig(num_rows=40_000, num_users=300, num_items=200, num_brands=40, seed=3)


@pytest.fixture(scope="session")
def small_log(tmp_path_factory) -> Path:
    """A 40,000-row synthetic log (train, test, items, truth, meta) in a temporary folder."""
    out = tmp_path_factory.mktemp("small_log")
    generate(SMALL, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
