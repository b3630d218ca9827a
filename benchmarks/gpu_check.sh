#!/usr/bin/env bash
# One-shot GPU check (under 8 minutes on one H100/H200): the CUDA path of every command on tiny data, DDP with
# 1 and 2 processes, then benchmarks/run.py into $OUT/bench.json. Ends with PASS/FAIL/SKIP per step and exits
# non-zero if any step failed; a failing step does not stop the others.
#
#   bash benchmarks/gpu_check.sh                       # on a GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh    # dry check of the script itself on a CPU
#
# Environment: OUT (default ./gpu_check_out), DEVICE (cuda), QUICK (0; 1 = smallest sizes, tiny benchmark),
# PYTHON (.venv/bin/python when present, else python3), STEP_TIMEOUT (seconds per command, default 240),
# BENCH_TIMEOUT (default 300).
set -u

OUT=${OUT:-./gpu_check_out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# The CLI through the interpreter itself, so no PATH or entry-point script is needed.
PS=("$PYTHON" -c "from patchscope.cli import main; main()")

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$OUT/work
LOGS=$OUT/logs
rm -rf "$W" "$LOGS"
mkdir -p "$W" "$LOGS"
GEN=$("$PYTHON" -c "from patchscope.analysis.demo import BUNDLED_GENERATOR; print(BUNDLED_GENERATOR)" 2>/dev/null)

NAMES=()
STATES=()
record() {  # name state seconds detail
    NAMES+=("$1")
    STATES+=("$2 ($3 s)${4:+ $4}")
    echo "--- $1: $2 ($3 s)${4:+ $4}"
}

# step NAME [TIMEOUT] -- COMMAND...: run with a timeout, log to $LOGS/NAME.log, record PASS or FAIL.
step() {
    local name=$1 limit=$STEP_TIMEOUT
    shift
    if [ "$1" != "--" ]; then limit=$1; shift; fi
    shift
    echo "=== $name: $*" | cut -c1-300
    local began=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        record "$name" PASS $((SECONDS - began))
    else
        local why="exit $rc"
        [ $rc -eq 124 ] && why="timed out after $limit s"
        record "$name" FAIL $((SECONDS - began)) "$why; last lines of $LOGS/$name.log:"
        tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'
    fi
    return $rc
}

skip() {
    record "$1" SKIP 0 "$2"
}

echo "== environment"
{
    date -u
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PYTHON" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version() if torch.cuda.is_available() else None, '| GPUs', torch.cuda.device_count()); [print(' ', i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
    echo "DEVICE=$DEVICE QUICK=$QUICK OUT=$OUT"
} 2>&1 | tee "$OUT/environment.txt"
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

if [ "$QUICK" = 1 ]; then N_TRAIN=40; N_EVAL=8; CROPS=10; else N_TRAIN=128; N_EVAL=32; CROPS=32; fi

# Tiny data: smooth random photos -> prepare (real crops at the bundled PGAN's 32 px), sample (fakes).
step photos -- "$PYTHON" - "$W/photos" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(6):
    small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    small.resize((96, 96), Image.BICUBIC).save(folder / f"photo{i}.png")
EOF
step prepare -- "${PS[@]}" prepare "$W/photos" --resolution 32 --random-crops "$CROPS" --crop-size 32 \
    --train 4 --val 1 --test 1 --out "$W/real"
step sample -- "${PS[@]}" sample "$GEN" --out "$W/fake" --train $((CROPS * 4)) --val "$CROPS" --test "$CROPS" \
    --device "$DEVICE"
step train -- "${PS[@]}" train --real "$W/real" --fake "$W/fake" --out "$W/run" --model xception_block1 \
    --init kaiming --load-size 32 --crop-size 32 --batch-size 16 --max-epochs 2 --device "$DEVICE"
step train_compile -- "${PS[@]}" train --real "$W/real" --fake "$W/fake" --out "$W/run_compiled" \
    --model xception_block1 --init kaiming --load-size 32 --crop-size 32 --batch-size 16 --max-epochs 1 --compile \
    --device "$DEVICE"
if grep -q "torch.compile of\|--compile:" "$LOGS/train_compile.log" 2>/dev/null; then
    echo "    train_compile ran uncompiled: $(grep -m1 "torch.compile of\|--compile:" "$LOGS/train_compile.log")"
fi
step eval -- "${PS[@]}" eval "$W/run" --test "tiny=$W/real,$W/fake" --heatmaps 2 --device "$DEVICE"
step score -- "${PS[@]}" score "$W/run" "$W/fake/test" --out "$W/scores" --device "$DEVICE"
step patches -- "${PS[@]}" patches "$W/run" --real "$W/real" --fake "$W/fake" -n 4 --device "$DEVICE"
step exaggerate -- "${PS[@]}" exaggerate --generator "$GEN" --classifier "$W/run" --out "$W/exaggerate" \
    --steps 3 --batch-size 4 --eval-n "$N_EVAL" --eval-batch-size 8 --grid-rows 2 --lpips-random --device "$DEVICE"
step finetune -- "${PS[@]}" finetune --generator "$GEN" --classifier "$W/run" --real "$W/real" --out "$W/finetune" \
    --steps 4 --batch-size 4 --checkpoint-every 2 --log-every 2 --eval-n "$N_EVAL" --compare-n "$N_EVAL" \
    --grid-rows 2 --lpips-random --device "$DEVICE"
if [ -f "$W/finetune/generator.pt" ]; then
    step retrain -- "${PS[@]}" retrain --classifier "$W/run" --generator "$W/finetune/generator.pt" \
        --out "$W/retrain" -n 4 --device "$DEVICE"
else
    record retrain FAIL 0 "no $W/finetune/generator.pt (finetune failed)"
fi
step invert -- "${PS[@]}" invert --generator "$GEN" --images "$W/real/test" --out "$W/invert" --steps 3 \
    --batch-size 4 --lpips-random --device "$DEVICE"
printf 'device: %s\n' "$DEVICE" >"$W/demo.yaml"
step demo -- "${PS[@]}" demo --quick --out "$W/demo" --config "$W/demo.yaml"

# The test cases that need CUDA (device cropping bit for bit against the host crop, pinned uint8 batches).
if [ "$DEVICE" != cpu ]; then
    step cuda_tests -- "$PYTHON" -m pytest -q -p no:cacheprovider -rs "$ROOT/tests/forensics/test_device_crop.py" -k cuda
else
    skip cuda_tests "DEVICE=cpu"
fi

# DDP: one process, then two (two GPUs; one GPU shared by two processes where NCCL allows it; gloo on CPU).
ddp_command() {  # NAME PROCS: sets DDP to the torchrun command line
    DDP=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$2" --no-python "${PS[@]}" train
         --real "$W/real" --fake "$W/fake" --out "$W/$1" --model xception_block1 --init kaiming --load-size 32
         --crop-size 32 --batch-size 16 --max-epochs 2 --device "$DEVICE")
}
if ! "$PYTHON" -c "import torch.distributed as d; assert d.is_available()" >/dev/null 2>&1; then
    skip ddp_1 "torch.distributed is not available"; skip ddp_2 "torch.distributed is not available"
elif ! "$PYTHON" -c "import patchscope.common.distributed" >/dev/null 2>&1; then
    skip ddp_1 "no DDP support in the library (patchscope.common.distributed)"
    skip ddp_2 "no DDP support in the library (patchscope.common.distributed)"
else
    ddp_command ddp_1 1
    step ddp_1 -- "${DDP[@]}"
    if [ "$DEVICE" != cpu ] && [ "$GPUS" -lt 2 ]; then
        # Two processes on one GPU: NCCL cannot share a device, so they share it over gloo (the DDP code on CUDA
        # tensors, not NCCL); without PATCHSCOPE_SHARE_GPUS the launch must be refused in one line.
        ddp_command ddp_2_refused 2
        began=$SECONDS
        timeout -k 10 120 "${DDP[@]}" >"$LOGS/ddp_2_refused.log" 2>&1
        rc=$?
        if [ $rc -eq 0 ] || [ $rc -ge 124 ]; then
            record ddp_2_refused FAIL $((SECONDS - began)) "2 processes on 1 GPU were not refused (exit $rc)"
        elif grep -q "NCCL cannot share a GPU" "$LOGS/ddp_2_refused.log"; then
            record ddp_2_refused PASS $((SECONDS - began))
        else
            record ddp_2_refused FAIL $((SECONDS - began)) "exit $rc without the one-line refusal; see $LOGS/ddp_2_refused.log"
        fi
        ddp_command ddp_2 2
        step ddp_2_shared_gpu -- env PATCHSCOPE_SHARE_GPUS=1 "${DDP[@]}"
    else
        ddp_command ddp_2 2
        step ddp_2 -- "${DDP[@]}"
    fi
fi

# The benchmark, sized to the budget.
if [ "$QUICK" = 1 ]; then
    BENCH_ARGS=(--sizes 32 --models xception_block1 --files-model xception_block1 --steps 1 --warmup 0 --batch 8
                --gen-sizes 32 --gen-batch 2 --attack-batch 4)
elif [ "$DEVICE" = cpu ]; then
    BENCH_ARGS=(--sizes 128 --steps 2 --warmup 1)
else
    BENCH_ARGS=(--sizes 128,299 --steps 10 --warmup 3 --published-sizes --attack-sizes demo,256)
fi
step bench "$BENCH_TIMEOUT" -- "$PYTHON" "$ROOT/benchmarks/run.py" --device "$DEVICE" --json "$OUT/bench.json" \
    "${BENCH_ARGS[@]}"
[ -f "$LOGS/bench.log" ] && sed -n '/^| workload/,$p' "$LOGS/bench.log"
if [ "$QUICK" != 1 ] && [ "$DEVICE" != cpu ]; then  # the compiled classifier step beside the eager one
    step bench_compile "$STEP_TIMEOUT" -- "$PYTHON" "$ROOT/benchmarks/run.py" --device "$DEVICE" --workloads train,eval \
        --models xception_block2 --sizes 299 --steps 10 --warmup 3 --compile --json "$OUT/bench_compile.json"
    [ -f "$LOGS/bench_compile.log" ] && sed -n '/^| workload/,$p' "$LOGS/bench_compile.log"
fi

echo
echo "== summary ($OUT)"
for i in "${!NAMES[@]}"; do
    printf '%-18s %s\n' "${NAMES[$i]}" "${STATES[$i]}"
done | tee "$OUT/summary.txt"
FAILED=$(grep -cE '^[^ ]+ +FAIL' "$OUT/summary.txt" || true)
if [ "$FAILED" -gt 0 ]; then
    echo "$FAILED step(s) failed"
    exit 1
fi
echo "all steps passed (or were skipped as said)"
