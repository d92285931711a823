#!/usr/bin/env bash
# Create .venv with the pinned stack of ../shared/STACK.md (constraints-cpu.txt) and this package in editable mode.
# (Into an environment of your own instead: docs/install.md.)
# Idempotent: a second run returns at once unless pyproject.toml, constraints-cpu.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.setup-stamp
wanted=$(cat pyproject.toml constraints-cpu.txt tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
echo "setting up .venv (pinned stack: torch 2.13.0 CPU, fbgemm-gpu-cpu 1.8.0, torchrec 1.9.2) ..."
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# torch first and alone: a bare dependency resolution could otherwise pick a CUDA build.
pip install -c constraints-cpu.txt torch
# cpu: fbgemm-gpu-cpu; text: transformers and the local MiniLM (tests use a tiny BERT); report: matplotlib for the run
# report; tensorboard: event files of the training curves
pip install -c constraints-cpu.txt -e ".[cpu,test,text,report,tensorboard,tune]"
# torchrec's metadata asks for fbgemm-gpu (the CUDA build), which would overwrite fbgemm-gpu-cpu: no deps.
pip install -c constraints-cpu.txt --no-deps torchrec
.venv/bin/python -c "import torchrec, fbgemm_gpu, torchrec_mtl" 
echo "$wanted" > "$stamp"
echo "setup done: $(.venv/bin/python -c 'import torch, torchrec; print("torch", torch.__version__, "torchrec", torchrec.__version__)')"
