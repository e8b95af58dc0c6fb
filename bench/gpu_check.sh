#!/usr/bin/env bash
# One prepared GPU check: every CUDA path of the project run once, and the GPU numbers BENCHMARKS.md lacks.
#
#     bash bench/gpu_wheels.sh && bash bench/gpu_check.sh out/gpu      # one H100 / H200: at most 8 minutes
#     bash bench/gpu_check.sh out/smoke --smoke                         # tiny presets, a few steps; the CPU if no GPU
#
# Everything goes into OUTDIR: per step a log (X.log) and a result (X.json), steps.jsonl (each step's exit status
# and seconds), env.json and summary.md (all of it in one page). The steps (bench/gpu_steps.py, one sub-command
# each; a step that fails or times out does not stop the others):
#   a  pytest -m cuda (tests/test_cuda.py): adapters' merge in bf16 / fp32, timm parity, SDPA, --amp fp16 / bf16
#   b  train_cls.py EF-L7 petah / lora / full, 200 steps, bf16, synthetic: the loss falls, merged == unmerged
#   c  torchrun --nproc_per_node 1 -- train_cls.py (NCCL), one epoch
#   d  train_seg.py PETRAS (SAM ViT-B, LoRA) at 1024, 4 steps, with and without --grad-ckpt: peak CUDA memory
#   e  bench/bench_peft.py --device cuda, EF-L7 and ViT-B: PETAH-2 / LoRA ATTN / full, ours / floor / timm+peft
#      step time and peak memory at batch 32 in bf16, merged vs base inference
#   f  bench/gpu_profile.py: torch.profiler of one EF-L7 PETAH-2 step (top kernels, host overhead)
# The machine has no internet: what is missing of pycocotools, segment-anything and pytest is installed from the
# wheels bench/gpu_wheels.sh put in .whl/ (pip --no-index). Exit status: 0 when every step passed its check.
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR [--smoke]" >&2
    exit 2
fi
OUT=$1
SMOKE=""
if [ "${2:-}" = "--smoke" ]; then
    SMOKE="--smoke"
elif [ -n "${2:-}" ]; then
    echo "gpu_check.sh: error: unknown option ${2}; usage: bash bench/gpu_check.sh OUTDIR [--smoke]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || command -v python3)}
export PYTHONUNBUFFERED=1
: > "$OUT/steps.jsonl"

# wheels for what the machine lacks (pip name:import name). Into the environment when pip may write there; else
# (an externally managed or read-only Python) into .whl/site, put on PYTHONPATH for every step; pycocotools and
# segment-anything without their dependencies there (numpy, torch: the machine's own).
SITE=$ROOT/.whl/site
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}  # (a folder that does not exist is skipped by Python)
{
    # one Python start finds what is missing (find_spec: importing segment_anything would import torch)
    missing=$("$PY" -c "import importlib.util as u
print(' '.join(p for p, m in [('pycocotools', 'pycocotools'), ('segment-anything', 'segment_anything'),
                              ('pytest', 'pytest')] if u.find_spec(m) is None))")
    for pkg in $missing; do
        if [ ! -d .whl ]; then
            echo "$pkg is missing and there is no .whl/: run bash bench/gpu_wheels.sh where PyPI is reachable"
            continue
        fi
        nodeps=$([ "$pkg" = pytest ] || echo --no-deps)
        "$PY" -m pip install --no-index --find-links .whl "$pkg" \
            || "$PY" -m pip install --no-index --find-links .whl --target "$SITE" $nodeps "$pkg" \
            || echo "could not install $pkg"
    done
} > "$OUT/install.log" 2>&1

DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>>"$OUT/install.log")
if [ "$DEVICE" != "cuda" ] && [ -z "$SMOKE" ]; then
    echo "gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False); the real check needs a GPU," \
         "a dry run on the CPU is: bash bench/gpu_check.sh $OUT --smoke" >&2
    exit 2
fi
# the CPU dry run: one thread per process (a shared machine)
[ "$DEVICE" = "cpu" ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# per-step limits are for one H100 / H200; the smoke run is bounded by its steps, not by time (a busy CPU)
SCALE=1
[ -n "$SMOKE" ] && SCALE=20
FAILED=0
# step NAME TIMEOUT_S COMMAND...: its log in OUT/NAME.log, {"step", "rc", "seconds"} appended to steps.jsonl.
# timeout signals the whole process group on expiry (DataLoader workers, torchrun's children), KILL 15 s later.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "[$name] $*"
    timeout -k 15 $((limit * SCALE)) "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $((limit * SCALE))}" >> "$OUT/steps.jsonl"
    echo "[$name] rc $rc, $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || FAILED=1
}

STEPS="$PY bench/gpu_steps.py"
step env 25 $STEPS env "$OUT" --device "$DEVICE" $SMOKE
step a_pytest 95 $STEPS pytest "$OUT" --device "$DEVICE" $SMOKE
step b_train_cls 110 $STEPS train_cls "$OUT" --device "$DEVICE" $SMOKE
step c_torchrun 30 $STEPS torchrun "$OUT" --device "$DEVICE" $SMOKE
step d_seg_memory 60 $STEPS seg_memory "$OUT" --device "$DEVICE" $SMOKE
step e_bench_peft 120 $STEPS bench_peft "$OUT" --device "$DEVICE" $SMOKE
step f_profile 30 "$PY" bench/gpu_profile.py --out "$OUT/f_profile.txt" --device "$DEVICE" $SMOKE
"$PY" bench/gpu_steps.py summary "$OUT" > /dev/null || FAILED=1
echo "summary: $OUT/summary.md"
exit $FAILED
