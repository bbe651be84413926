#!/usr/bin/env bash
# The budget table with several seeds and 10,000 validation images, on a GPU machine in one call.
#
#   bench/gpu_budget.sh [SECONDS]     (default 300: the runs still going then are stopped)
#
# Needs, at the repository root (carried to the device machine; nothing is downloaded):
#   .whl/         the wheels the bare GPU image lacks (as bench/gpu_check.sh)
#   .benchcache/  fp32.safetensors + fp32.json (the demo's FP32 start, from `codeq demo` or
#                 bench/budget.py) and t10k-{images-idx3,labels-idx1}-ubyte.gz (Debian's
#                 dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)
# Writes $OUT/budget/{table.md,results.json,err.txt}. RUNS, SEEDS, EXTRA, JOBS, EPOCHS and SUBSET
# may be set in the environment (EPOCHS=1 SUBSET=20 JOBS=2: a logic check on CPU;
# RUNS=maxdrop1 EXTRA= : the --max-drop search alone, seeds 0-4).
set -u
cd "$(dirname "$0")/.." || exit 1
LIMIT=${1:-300}
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/budget
mkdir -p "$LOG"
. bench/_wheels.sh
export NO_COLOR=1 PYTHONUNBUFFERED=1
WORK=/tmp/codeq-bench-budget
mkdir -p "$WORK"
cp .benchcache/fp32.safetensors .benchcache/fp32.json "$WORK/"
# Seeds 0-2 of the 4% comparison first, then the other targets once, then more seeds.
RUNS=${RUNS:-"grid0.002,grid0.005,grid0.01,bops4,bops4-sens"}
SEEDS=${SEEDS:-"0,1,2,3,4"}
EXTRA=${EXTRA-"bops2-sens@0,bops8-sens@0,size-sens@0,bops2@0,bops8@0"}  # EXTRA= (empty): none
timeout -k 5 "$LIMIT" "$PY" bench/budget.py --out-dir "$WORK" --epochs "${EPOCHS:-4}" ${SUBSET:+--subset $SUBSET} --val-test10k --fmnist .benchcache \
    --seeds 0,1,2 --only "$RUNS${EXTRA:+,$EXTRA}" --jobs "${JOBS:-14}" > "$LOG/table.md" 2> "$LOG/err.txt"
echo "first pass: exit $?" >> "$LOG/err.txt"
LEFT=$(( LIMIT - SECONDS - 10 ))
if [ "$LEFT" -gt 60 ] && [ "$SEEDS" != "0,1,2" ]; then
    timeout -k 5 "$LEFT" "$PY" bench/budget.py --out-dir "$WORK" --epochs "${EPOCHS:-4}" ${SUBSET:+--subset $SUBSET} --val-test10k --fmnist .benchcache \
        --seeds "${SEEDS#0,1,2,}" --only "$RUNS" --jobs "${JOBS:-14}" >> "$LOG/err.txt" 2>&1
    echo "second pass: exit $?" >> "$LOG/err.txt"
fi
"$PY" bench/budget.py --out-dir "$WORK" --table > "$LOG/table.md" 2>> "$LOG/err.txt"
cp "$WORK/bench-budget/results.json" "$LOG/" 2>/dev/null
cat "$LOG/table.md"
tail -3 "$LOG/err.txt"
