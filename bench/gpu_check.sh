#!/usr/bin/env bash
# One call on a GPU machine checks codeq's CUDA path and prints one summary table.
#
#   bench/gpu_check.sh          on the GPU machine (one call, under 8 minutes in all)
#   bench/gpu_check.sh --cpu    the same sections on CPU with tiny sizes (checks this script's logic)
#
# Sections, each under its own timeout (a hang costs its section only; the
# script goes on after a failure):
#   env         torch, the GPUs, native bfloat16; a tiny generated image folder (no downloads)
#   tests       the tests that CI skips for want of CUDA (pytest -k "cuda or pinned")
#   compress    2 steps with amp and channels_last, then `codeq eval` of the result: same top-1
#   compile     2 steps with --compile on one GPU
#   ddp         2 processes with sync_bn on timm:test_efficientnet (BatchNormAct2d layers):
#               ranks identical, eval top-1 = compress top-1 (skipped with fewer than 2 GPUs)
#   throughput  bench/throughput.py: ResNet-18, 224 px, bf16: images/s FP32 vs CoDeQ, peak memory,
#               and a profile of the CoDeQ step (top ops by device and host time, synchronisations)
#   memory      bench/linear_memory.py: peak memory of a 16384x16384 linear step, plain vs CoDeQ
#   budget      --target-bops 3 with 8-bit activations and amp: the figure lands in [2.91, 3]
#   tp_compile  throughput.py --compile: does compiling remove the quantizers' launch overhead?
#   pace        issue 22's figures: bench/throughput.py for ResNet-18 and ResNet-50 at 224 px, bf16,
#               channels_last, batch 128, mixed recipe, no budget, no distillation: CoDeQ images/s over
#               FP32's (goal >= 0.95) and peak memory over FP32's (goal <= 1.15). Alone, in one call:
#               CODEQ_GPU_CHECK_SECTIONS="env pace" bench/gpu_check.sh
#
# Environment: PYTHON (default python3); OUT (logs go to $OUT/gpu_check/: env.log,
# sections.log with every section's output in turn, summary.txt; else to a temporary folder); CODEQ_GPU_CHECK_CPU=1 is --cpu;
# CODEQ_GPU_CHECK_BUDGET (seconds for all sections, default 420); CODEQ_GPU_CHECK_SECTIONS (the
# sections to run, default all, e.g. "env pace").
# With a folder .whl/ at the repository root (the wheels the bare GPU image lacks:
# pydantic, pydantic-core, annotated-types, typing-inspection, constriction) they are
# installed into /tmp/site first; nothing is downloaded. Exit status 1 when a section failed.

set -u
cd "$(dirname "$0")/.." || exit 1
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
[ "${CODEQ_GPU_CHECK_CPU:-0}" = "1" ] && CPU=1
PY=${PYTHON:-python3}
BUDGET=${CODEQ_GPU_CHECK_BUDGET:-420}
START=$(date +%s)
if [ -n "${OUT:-}" ]; then LOG="$OUT/gpu_check"; else LOG=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); fi
mkdir -p "$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

WHEELS_LOG="$LOG/env.log" . bench/_wheels.sh
export PY CPU WORK NO_COLOR=1 PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then export DEV=cpu; else export DEV=cuda; fi
# The compress runs: a tiny generated folder, random weights, two steps.
export TINY="--data $WORK/data --no-pretrained --num-classes 3 --workers 2 --max-steps 2 --batch-size 8 --skip-baseline --json"

# -- sections: each prints KEY: <its figure> and exits 0 (pass), 77 (skip) or other (fail) ----------
s_env() {
    "$PY" - <<'EOF'
import os, random, sys
import torch
from pathlib import Path
from PIL import Image
cpu = os.environ["CPU"] == "1"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
gpus = []
for i in range(n):
    cap = torch.cuda.get_device_capability(i)
    gpus.append(f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}{', bf16' if cap[0] >= 8 else ', no native bf16'})")
    print(f"cuda:{i}", gpus[-1], f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
rng = random.Random(0)
for split, count in (("train", 8), ("val", 3)):
    for ci, (name, colour) in enumerate((("cat", (220, 40, 40)), ("dog", (40, 200, 60)), ("fox", (50, 70, 230)))):
        folder = Path(os.environ["WORK"]) / "data" / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = Image.new("RGB", (48, 48), tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour))
            img.save(folder / f"{name}_{i}.png")
print("data:", os.environ["WORK"] + "/data", "(3 classes, 24 train, 9 val)")
if not cpu and n == 0:
    print("KEY: no CUDA device visible"); sys.exit(1)
print(f"KEY: torch {torch.__version__}; " + (f"{n}x {gpus[0]}" if n else "CPU dry run"))
EOF
}

s_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -rs -k "cuda or pinned" \
        tests/test_quantizer.py tests/test_select.py tests/test_data.py tests/test_gpu_path.py 2>&1 | tee "$WORK/pytest.txt"
    local rc=${PIPESTATUS[0]}
    local line
    line=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$WORK/pytest.txt" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    echo "KEY: $line"
    if [ "$CPU" != 1 ] && grep -q ' skipped' <<<"$line"; then return 1; fi  # on a GPU nothing may be skipped
    return "$rc"
}

# compare.py-like check: compress JSON vs eval JSON (and, on a GPU, the recorded arithmetic)
_same_top1() {  # compress.json eval.json what
    "$PY" - "$@" <<'EOF'
import json, os, sys
c, e = (json.load(open(p)) for p in sys.argv[1:3])
top_c, top_e = c["metrics"]["top1"], e["top1"]
arith = e.get("arithmetic", {})
want = "float32" if os.environ["CPU"] == "1" else "bfloat16"
ok = top_c == top_e and arith.get("eval_dtype") in (want, "float32")
print(f"KEY: {sys.argv[3]}top-1 compress {top_c:.2f} / eval {top_e:.2f}; eval in {arith.get('eval_dtype')}"
      f"{', channels_last' if arith.get('eval_channels_last') else ''}")
sys.exit(0 if ok else 1)
EOF
}

s_compress() {
    "$PY" -m codeq_cli compress timm:test_resnet $TINY --img-size 64 --device "$DEV" \
        --set amp=true --set channels_last=true --out "$WORK/amp.pt" > "$WORK/amp.json" || return 1
    "$PY" -m codeq_cli eval "$WORK/amp.pt" --device "$DEV" --batch-size 8 --workers 2 --json > "$WORK/amp_eval.json" || return 1
    cat "$WORK/amp.json" "$WORK/amp_eval.json"
    _same_top1 "$WORK/amp.json" "$WORK/amp_eval.json" ""
}

s_compile() {
    [ "$CPU" = 1 ] && export CODEQ_KERNELS=torch  # numba's CPU loops cannot be compiled
    local t0=$SECONDS
    if ! "$PY" -m codeq_cli compress timm:test_resnet $TINY --img-size 64 --device "$DEV" --compile \
        --out "$WORK/compiled.pt" > "$WORK/compiled.json" 2> "$WORK/compiled.err"; then
        cat "$WORK/compiled.err"
        local last
        last=$(grep -a '^error:' "$WORK/compiled.err" | tail -n 1)
        # On CPU --compile is not supported (docs/distributed.md); it must still fail in one line.
        if [ "$CPU" = 1 ] && [[ "$last" == "error: torch.compile failed"* ]]; then
            echo "KEY: CPU: the one-line compile error, as documented"; return 77
        fi
        return 1
    fi
    cat "$WORK/compiled.err" "$WORK/compiled.json"
    echo "KEY: 2 compiled steps, $((SECONDS - t0)) s with compilation"
}

s_ddp() {
    local sync=true
    if [ "$CPU" = 1 ]; then
        sync=false  # PyTorch's SyncBatchNorm has no CPU kernel: the dry run checks the rest
    elif [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
        echo "KEY: fewer than 2 GPUs"; return 77
    fi
    CODEQ_DEBUG_DUMP_DIR="$WORK/dump" "$PY" -m codeq_cli compress timm:test_efficientnet $TINY --img-size 64 \
        --device "$DEV" --nproc 2 --set sync_bn=$sync --out "$WORK/ddp.pt" > "$WORK/ddp.json" || return 1
    "$PY" -m codeq_cli eval "$WORK/ddp.pt" --device "$DEV" --batch-size 8 --workers 2 --json > "$WORK/ddp_eval.json" || return 1
    "$PY" - <<'EOF' || return 1
import os, torch
d = os.environ["WORK"] + "/dump"
a, b = (torch.load(f"{d}/rank{r}.pt", weights_only=True) for r in (0, 1))
diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
diff += [k for k in a["layers"] if not torch.equal(a["layers"][k]["codes"], b["layers"][k]["codes"])]
print("ranks differ in:", diff[:5] if diff else "nothing")
raise SystemExit(1 if diff else 0)
EOF
    _same_top1 "$WORK/ddp.json" "$WORK/ddp_eval.json" "sync_bn=$sync, 2 ranks identical; "
}

s_throughput() {
    if [ "$CPU" = 1 ]; then
        "$PY" bench/throughput.py --device cpu --model resnet18 --size 32 --batch 4 --steps 2 --warmup 1 | tee "$WORK/tp.txt"
    else
        "$PY" bench/throughput.py --device cuda --model resnet18 --size 224 --batch 64 --steps 10 --warmup 3 --profile 15 \
            | tee "$WORK/tp.txt"
    fi
    local rc=${PIPESTATUS[0]}
    awk '$1 == "fp32" {f = $2; if (/peak/) fm = $(NF-1)} $1 == "codeq" {c = $2; if (/peak/) cm = $(NF-1)}
         /^throughput_ratio=/ {split($1, r, "="); ratio = r[2]}
         END {printf "KEY: images/s FP32 %s, CoDeQ %s (x%s)", f, c, ratio; if (cm != "") printf "; peak GiB %s / %s", fm, cm; print ""}' \
        "$WORK/tp.txt"
    return "$rc"
}

s_memory() {
    if [ "$CPU" = 1 ]; then
        "$PY" bench/linear_memory.py --device cpu --features 256 --batch 4 | tee "$WORK/mem.txt"
    else
        "$PY" bench/linear_memory.py --device cuda --features 16384 --batch 64 | tee "$WORK/mem.txt"
    fi
    local rc=${PIPESTATUS[0]}
    echo "KEY: $(tail -n 1 "$WORK/mem.txt")"
    return "$rc"
}
s_budget() {  # the budget controller, distillation-free random start, and 8-bit activations on the device
    "$PY" -m codeq_cli compress timm:test_resnet $TINY --img-size 64 --device "$DEV" --target-bops 3 \
        --set act_bits=8 --set amp=true --out "$WORK/budget.pt" > "$WORK/budget.json" || return 1
    "$PY" - "$WORK/budget.json" <<'EOF2'
import json, sys
r = json.load(open(sys.argv[1]))
rel = r["totals"]["rel_bops"]
print(f"KEY: target 3% rel BOPs (8-bit activations): achieved {rel:.3f}%, top-1 {r['metrics']['top1']:.2f}")
sys.exit(0 if 0.97 * 3 <= rel <= 3.0 + 1e-9 else 1)
EOF2
}

s_tp_compile() {  # the same throughput with torch.compile on both models (launch overhead vs fused kernels)
    [ "$CPU" = 1 ] && { echo "KEY: GPU only"; return 77; }
    "$PY" bench/throughput.py --device cuda --model resnet18 --size 224 --batch 64 --steps 10 --warmup 3 --compile \
        | tee "$WORK/tpc.txt"
    local rc=${PIPESTATUS[0]}
    awk '$1 == "fp32" {f = $2} $1 == "codeq" {c = $2} /^throughput_ratio=/ {split($1, r, "="); ratio = r[2]}
         END {printf "KEY: compiled: images/s FP32 %s, CoDeQ %s (x%s)\n", f, c, ratio}' "$WORK/tpc.txt"
    return "$rc"
}
s_pace() {  # issue 22: images/s and peak memory against FP32, ResNet-18 and ResNet-50, then the launch counts
    local rc=0 model
    for model in resnet18 resnet50; do
        if [ "$CPU" = 1 ]; then
            "$PY" bench/throughput.py --device cpu --model "$model" --size 32 --batch 2 --steps 2 --warmup 1 \
                > "$WORK/pace_$model.txt" || rc=1
        else
            "$PY" bench/throughput.py --device cuda --model "$model" --size 224 --batch 128 --steps 10 --warmup 3 \
                > "$WORK/pace_$model.txt" || rc=1
        fi
        cat "$WORK/pace_$model.txt"
    done
    # the launch counts are CPU figures (bench/launches.py, docs/performance.md): not repeated here
    awk 'FNR == 1 {m = FILENAME; sub(/.*pace_/, "", m); sub(/\.txt$/, "", m)}
         /^throughput_ratio=/ {split($1, r, "="); t[m] = r[2]} /^peak_memory_ratio=/ {split($1, r, "="); p[m] = r[2]}
         END {printf "KEY: CoDeQ/FP32 images/s R18 x%s R50 x%s (goal 0.95); peak mem R18 x%s R50 x%s (goal 1.15)\n",
              t["resnet18"], t["resnet50"], p["resnet18"], p["resnet50"]}' "$WORK"/pace_resnet18.txt "$WORK"/pace_resnet50.txt
    return "$rc"
}
export -f s_env s_tests _same_top1 s_compress s_compile s_ddp s_throughput s_memory s_budget s_tp_compile s_pace

ROWS=()
FAILED=0
section() {  # name timeout_s
    local name=$1 limit=$2
    case " ${CODEQ_GPU_CHECK_SECTIONS:-$name} " in *" $name "*) ;; *) return ;; esac
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then ROWS+=("$name|skip|0s|no time left"); return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 rc key status
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c "s_$name" > "$WORK/$name.log" 2>&1
    rc=$?
    { echo "===== $name (exit $rc) ====="; cat "$WORK/$name.log"; echo; } >> "$LOG/sections.log"
    key=$(grep -a '^KEY:' "$WORK/$name.log" | tail -n 1 | cut -c6- | cut -c1-90)
    case $rc in
        0) status=pass ;;
        77) status=skip ;;
        124|137) status=fail; key="timed out after ${limit}s" ;;
        *) status=fail; [ -z "$key" ] && key=$(grep -a -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-90) ;;
    esac
    [ "$status" = fail ] && FAILED=1
    ROWS+=("$name|$status|$(($(date +%s) - t0))s|$key")
    echo "[gpu_check] $name: $status ($key)" >&2
}

# Timeouts sum to the budget's order; a late section gets what is left (the script stays under 8 minutes).
# The CPU dry run compiles with inductor's C++ backend on a few cores: it gets longer, and its own budget.
COMPILE_S=120
if [ "$CPU" = 1 ]; then COMPILE_S=${CODEQ_GPU_CHECK_CPU_COMPILE_S:-300}; BUDGET=$((BUDGET + COMPILE_S)); fi
section env 60
section tests 90
section compress 75
section compile "$COMPILE_S"
section ddp 90
section throughput 75
section memory 45
section budget 60
section tp_compile 150
section pace 240

{
    echo
    echo "codeq gpu_check ($([ "$CPU" = 1 ] && echo "CPU dry run" || echo GPU)), $(($(date +%s) - START)) s, logs in $LOG"
    printf '%-11s %-5s %6s  %s\n' section result time "key figure"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r n s t k <<<"$row"
        printf '%-11s %-5s %6s  %s\n' "$n" "$s" "$t" "$k"
    done
} | tee "$LOG/summary.txt"
exit "$FAILED"
