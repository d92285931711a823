"""The README's "In your own TorchRec model" block runs as written, and its objective trains the tower."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block() -> str:
    section = (ROOT / "README.md").read_text().split("## In your own TorchRec model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_plug_in_example_runs_and_prints_every_evaluated_name() -> None:
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(_block(), "README.md", "exec"), namespace)
    assert printed.getvalue().strip() == "['ctcvr', 'ctr', 'cvr', 'rating']"
    # the loss reached the tower and the tables: every parameter has a gradient
    assert all(p.grad is not None for p in namespace["tower"].parameters())
    assert all(p.grad is not None for p in namespace["ebc"].parameters())
    # CVR is labelled on clicked rows only; CTCVR on every row
    labels, click = namespace["labels"], namespace["click"]
    assert bool((labels["cvr"].isnan() == (click == 0)).all()) and not bool(labels["ctcvr"].isnan().any())
