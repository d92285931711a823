#!/usr/bin/env bash
# Set up (once) and run the test suite: the unit tier (what a bare `pytest` runs), then the end-to-end tier
# (`pytest -m e2e`: whole jobs, several processes, CLI stages). Fails if either tier fails. Arguments go to both runs
# (paths, -k, -x, ...); a tier with nothing selected by them counts as passed. With a -m of your own, pytest runs once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

own_marker=false
for arg in "$@"; do
    case "$arg" in -m | -m*) own_marker=true ;; esac
done
if $own_marker; then
    exec .venv/bin/python -m pytest -q "$@"
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
status=0
empty=0
for tier in unit e2e; do
    if [ "$tier" = unit ]; then marker="not e2e"; else marker="e2e"; fi
    echo "== $tier tier (pytest -m \"$marker\")"
    code=0
    .venv/bin/python -m pytest -q -m "$marker" "$@" 2>&1 | tee "$logs/$tier.log" || code=$?
    # 5: no test selected (the arguments named only tests of the other tier)
    if [ "$code" -eq 5 ]; then empty=$((empty + 1)); elif [ "$code" -ne 0 ]; then status=$code; fi
done
if [ "$empty" -eq 2 ]; then status=5; fi
echo "== summary"
for tier in unit e2e; do
    printf '%-5s%s\n' "$tier" "$(grep -v '^$' "$logs/$tier.log" | tail -n 1)"
done
exit "$status"
