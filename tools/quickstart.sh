#!/usr/bin/env bash
# Set up (once) and run the main job: generate the default synthetic log, train MMoE (CTR, CVR, rating) through
# TorchRec's sharded pipeline, evaluate, and print the per-task table beside the data's ceilings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/torchrec-mtl train --config configs/mmoe_synthetic.yaml "$@"
