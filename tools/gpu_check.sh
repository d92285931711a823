#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, install the CUDA stack, run the main job on the GPU, then evaluate,
# predict and export with --device cuda, and write every step's JSON into OUT (docs/operations.md, "GPU: what has
# and has not run on one", records what has).
#
#   tools/gpu_check.sh [--dry-run] [--wheels DIR] [--python PY] [--rows N] [--work DIR] OUT
#
#   --dry-run     (or GPU_CHECK_DRY_RUN=1) the same steps on the CPU with tiny sizes and the existing .venv
#                 (GPU_CHECK_PYTHON or --python overrides it); nothing is installed. tests/test_gpu_check.py runs it.
#   --wheels DIR  install from the wheels in DIR only (pip --no-index): torch 2.13.0 (a CUDA build), fbgemm-gpu 1.8.0
#                 (the CUDA build, not fbgemm-gpu-cpu), torchrec 1.9.2 and the package's other dependencies; without
#                 it they come from the package index
#   --python PY   an environment that already holds that stack: nothing is installed
#   --rows N      rows of the generated log (default: the main job's 3,000,000, a few minutes on one GPU; 5,000 dry)
#   --work DIR    where the data, runs, checkpoints and scores go (default runs/gpu_check); OUT gets JSON and logs only
#
# OUT: env.json, train.json (the main job's results.json), evaluate.json, predict.json, export.json (both artifacts'
# manifests and their scores against the loaded model's), train_bf16.json, train_fp16.json (the same job under
# training.precision), bench.json, summary.json (each step's status and seconds, the precisions side by side) and
# logs/<step>.log. A step that fails does not stop the others (those that need its output are skipped); the script
# exits 1 when any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

dry=${GPU_CHECK_DRY_RUN:-0}
wheels="" py=${GPU_CHECK_PYTHON:-} rows="" work="runs/gpu_check" out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --wheels) wheels=$2; shift ;;
        --python) py=$2; shift ;;
        --rows) rows=$2; shift ;;
        --work) work=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "gpu_check: one OUT folder, got $out and $1" >&2; exit 2; }; out=$1 ;;
    esac
    shift
done
[ -n "$out" ] || { echo "gpu_check: give the OUT folder for the JSON (see --help)" >&2; exit 2; }
mkdir -p "$out/logs" "$work"
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd)

# --- the environment -------------------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
    device=cpu
    py=${py:-$ROOT/.venv/bin/python}
    rows=${rows:-5000}
    # tiny sizes: a few hundred users, a hundred items, about 30 steps of 128 rows, so that each command takes
    # seconds on two cores (most of it starting Python and torch)
    sizes=("data.generate.num_users=200" "data.generate.num_items=100" "data.generate.num_brands=20"
           "data.generate.num_sessions=300" "training.batch_size=128" "training.eval_batch_size=2048"
           "training.curve_every=10")
else
    device=cuda
    sizes=()
    if [ -z "$py" ]; then
        # a venv of its own: the CPU .venv holds fbgemm-gpu-cpu, which the CUDA build must not sit beside
        venv=$ROOT/.venv-gpu
        py=$venv/bin/python
        stamp=$venv/.gpu-check-stamp
        if [ ! -f "$stamp" ]; then
            echo "gpu_check: installing the CUDA stack into $venv ..."
            [ -x "$py" ] || "${PYTHON:-python3.11}" -m venv "$venv"
            source=()
            [ -z "$wheels" ] || source=(--no-index --find-links "$wheels")
            pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
            # the package's dependencies less fbgemm-gpu-cpu, plus the text extra (the main job encodes item text)
            mapfile -t deps < <("$py" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = p["dependencies"] + p["optional-dependencies"]["text"]
print("\n".join(d for d in deps if not d.startswith(("fbgemm", "torch="))))')
            pip install "${source[@]}" "torch==2.13.0" "fbgemm-gpu==1.8.0" "${deps[@]}"
            # torchrec's metadata would pull fbgemm-gpu again; this package's would pull fbgemm-gpu-cpu
            pip install "${source[@]}" --no-deps "torchrec==1.9.2"
            touch "$stamp"
        fi
    fi
fi
[ -x "$py" ] || command -v "$py" >/dev/null || { echo "gpu_check: no python at $py" >&2; exit 2; }
export TORCHREC_MTL_TRACEBACK=1  # a failure's traceback goes into its step's log
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # this checkout's package, installed or not
cli=("$py" -m torchrec_mtl.cli)
data=$work/data
# one pass (the shipped configs train up to 10, stopping early on validation): the check is of the code paths
common=("data.dir=$data" "training.progress=false" "checkpoint.resume=never" "training.epochs=1" "${sizes[@]}")
[ -z "$rows" ] || common+=("data.generate.num_rows=$rows")

# --- the steps ---------------------------------------------------------------------------------------------------
steps=$out/logs/steps.tsv
: > "$steps"
failed=0
# step NAME COMMAND...: run it, its output into logs/NAME.log, its status and seconds into logs/steps.tsv
step() {
    local name=$1; shift
    local start=$SECONDS rc=0
    echo "gpu_check: $name ..."
    "$@" > "$out/logs/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$steps"
    if [ "$rc" -ne 0 ]; then
        failed=1
        echo "gpu_check: $name failed (exit $rc); its log: $out/logs/$name.log" >&2
        tail -n 5 "$out/logs/$name.log" >&2
    fi
    return "$rc"
}
skip() { printf '%s\tskipped\t0\n' "$1" >> "$steps"; echo "gpu_check: $1 skipped ($2)"; }
helper=("$py" "$ROOT/tools/gpu_check_steps.py")

step env "${helper[@]}" env --device "$device" --dry-run "$dry" --out "$out/env.json" || {
    echo "gpu_check: the environment cannot run on $device; nothing else was run" >&2
    exit 1
}
run=$work/run
if step train "${cli[@]}" train --config configs/mmoe_synthetic.yaml "out_dir=$run" "${common[@]}"; then
    cp "$run/results.json" "$out/train.json"
    checkpoints=$run/checkpoints
    step evaluate "${cli[@]}" evaluate --checkpoint "$checkpoints" --device "$device" training.progress=false &&
        cp "$run/evaluation.json" "$out/evaluate.json" || true
    step predict "${helper[@]}" predict --checkpoint "$checkpoints" --input "$data/test.tsv" \
        --scores "$work/scores.tsv" --device "$device" --out "$out/predict.json" || true
    if step export "${cli[@]}" export --checkpoint "$checkpoints" --out "$work/export" --device "$device" &&
        step export_int8 "${cli[@]}" export --checkpoint "$checkpoints" --out "$work/export_int8" --quantize \
            --device "$device"; then
        step export_check "${helper[@]}" export-check --checkpoint "$checkpoints" --fp32 "$work/export" \
            --int8 "$work/export_int8" --device "$device" --out "$out/export.json" || true
    fi
else
    for name in evaluate predict export export_int8 export_check; do skip "$name" "train failed"; done
fi
for precision in bf16 fp16; do
    # the same job and data under autocast (fp16 with loss scaling): its own figures beside fp32's
    step "train_$precision" "${cli[@]}" train --config configs/mmoe_synthetic.yaml "out_dir=$work/run_$precision" \
        "training.precision=$precision" "${common[@]}" && cp "$work/run_$precision/results.json" \
        "$out/train_$precision.json" || true
done
# tools/bench_train.py cannot time a GPU: its plain-PyTorch contenders stay on the host, its step timer does not
# synchronise CUDA, and its world-size-2 memory measure needs two devices; the GPU figures are train.json's
step bench "${helper[@]}" bench-note --out "$out/bench.json" || true
"${helper[@]}" summary --out "$out" --device "$device" --dry-run "$dry"
exit "$failed"
