"""The package's public API: every name of ``torchrec_mtl.__all__`` resolves, ``import torchrec_mtl`` (and the
report) load no torch, and ``--version`` prints the version."""

from __future__ import annotations

import subprocess
import sys

import pytest

import torchrec_mtl
from torchrec_mtl.cli import main


def test_every_public_name_resolves_to_what_its_module_defines():
    for name in torchrec_mtl.__all__:
        assert getattr(torchrec_mtl, name) is not None, name
    from torchrec_mtl.modules.towers import MMoE
    from torchrec_mtl.tasks import MultiTaskObjective

    assert torchrec_mtl.MMoE is MMoE and torchrec_mtl.MultiTaskObjective is MultiTaskObjective
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        torchrec_mtl.nothing  # noqa: B018


def test_importing_the_package_and_its_report_loads_no_torch():
    code = "import sys, torchrec_mtl, torchrec_mtl.report; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchrec-mtl {torchrec_mtl.__version__}"
