#!/usr/bin/env bash
# Check that torchrec-mtl installs into an environment of one's own as docs/install.md says, with no setup script:
# in a fresh venv in a temporary folder, torch and torchrec the way TorchRec documents them (torch, FBGEMM,
# torchmetrics, torchrec), adapted to PyPI (the CPU build of FBGEMM is fbgemm-gpu-cpu there, and torchrec goes in
# with --no-deps, as its metadata would pull the CUDA build), then `pip install <this clone>`, then run
# `torchrec-mtl --version`, `torchrec-mtl configs`, `configs --copy` and a small `train` on the copied
# configs/mmoe_synthetic.yaml (a 20,000-row generated log, IDs only). Versions: constraints-cpu.txt.
# Usage: bash tools/check_install.sh   (PYTHON=python3.11 by default; KEEP=1 keeps the folder); 2 to 3 min on 2 cores.
set -euo pipefail
clone=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
work=$(mktemp -d "${TMPDIR:-/tmp}/torchrec-mtl-install.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
start=$SECONDS
step() { echo; echo "== [$((SECONDS - start)) s] $*"; }
pin() { grep -E "^$1==" "$clone/constraints-cpu.txt"; }  # the verified version of one package
pip() { "$work/venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

step "a fresh venv ($("$PYTHON" --version)) in $work"
"$PYTHON" -m venv "$work/venv"
step "torch, then FBGEMM (CPU build), torchmetrics, torchrec without its dependencies: $(pin torch), \
$(pin fbgemm-gpu-cpu), $(pin torchmetrics), $(pin torchrec)"
pip install "$(pin torch)"
pip install "$(pin fbgemm-gpu-cpu)"
pip install "$(pin torchmetrics)"
pip install --no-deps "$(pin torchrec)"
step "pip install $clone"
echo "(pip then says that torchrec requires fbgemm-gpu, which is not installed: expected, fbgemm-gpu-cpu provides it)"
leftovers=()  # what pip's in-tree build leaves in the clone, removed after unless it was there before
for path in build torchrec_mtl.egg-info; do [ -e "$clone/$path" ] || leftovers+=("$clone/$path"); done
pip install "$clone"
rm -rf "${leftovers[@]}"
"$work/venv/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|torchrec|torchrec-mtl|fbgemm.*|torchmetrics) "
if "$work/venv/bin/python" -m pip show -q fbgemm-gpu 2>/dev/null; then
    echo "FAILED: fbgemm-gpu (the CUDA build) was installed beside fbgemm-gpu-cpu" >&2
    exit 1
fi

cd "$work"  # not the clone: the installed package must find its configs in itself
bin=$work/venv/bin
step "torchrec-mtl --version"
"$bin/torchrec-mtl" --version
step "torchrec-mtl configs"
"$bin/torchrec-mtl" configs
step "torchrec-mtl configs --copy project"
"$bin/torchrec-mtl" configs --copy project
step "a small train on the shipped configs/mmoe_synthetic.yaml, in project/"
cd project
"$bin/torchrec-mtl" train --config configs/mmoe_synthetic.yaml data.generate.num_rows=20000 model.text=null \
    training.batch_size=256 training.progress=false
test -s runs/main/results.json || { echo "FAILED: no project/runs/main/results.json" >&2; exit 1; }
step "done: installed, listed, copied and trained (results in project/runs/main/results.json)"
