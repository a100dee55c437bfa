#!/usr/bin/env bash
# Every GPU benchmark in one run, for a session lent an accelerator (one H200) through the
# device tool: under 8 minutes on that machine's preinstalled jax/flax/optax, no installs.
#
#   run: PYTHONPATH=. bash benchmarks/device.sh      (results land in $OUT, default /tmp/kdjax-device)
#
# Each step has its own time limit and a failed step does not stop the others; the log says
# which ones ran. Ratios are measured inside one run (fused vs naive, achieved FLOP/s vs the
# matmul peak measured in the same process); copy the markdown into benchmarks/results/ and
# rebuild benchmarks/README.md with `python benchmarks/collect.py`.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
OUT="${OUT:-/tmp/kdjax-device}"
mkdir -p "$OUT"
LOG="$OUT/device.log"
: > "$LOG"

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  if timeout "$limit" "$@" >> "$LOG" 2>&1; then
    echo "== $name ok in $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "== $name FAILED (rc $?) after $((SECONDS - t0)) s" | tee -a "$LOG"
  fi
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  python -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
  python -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>/dev/null || echo "torch: not installed (torch baselines skipped)"
} >> "$LOG" 2>&1
TORCH=--no-torch
python -c "import torch" 2>/dev/null && TORCH=

# 1. fused vs naive loss kernels at GPU-sized shapes (bf16 inputs, f32 accumulation), plus
#    JSD and the online TeacherHead; the matmul peak is measured in the same process.
step losses 200 python benchmarks/losses.py --n 8192 32768 --h 4096 --v 131072 \
  --dtype bf16 --run-n 8192 --sections grid jsd head --compare-n 8192 --repeats 5 \
  $TORCH --max-gib 100 --out "$OUT/losses_gpu.md"

# 2. model forward+backward and KV-cache generation tokens/s (kdjax vs transformers torch
#    when torch has CUDA), a ~1B-parameter-shaped student at a short sequence.
step model 150 python benchmarks/model.py --batch 8 --seq 1024 --layers 8 --hidden 2048 \
  --vocab 32768 --repeats 5 --gen-batch 8 --gen-prompt 128 --gen-new 128 \
  --out "$OUT/model_gpu.md"

# 3. the train step's measured MFU on one GPU against the roofline estimate of
#    `kdjax compile` (benchmarks/scale.py --device runs both when the script supports it).
if python benchmarks/scale.py --help 2>/dev/null | grep -q -- "--measure"; then
  step scale 120 python benchmarks/scale.py --measure --out "$OUT/scale_gpu.md"
fi

echo "results in $OUT" | tee -a "$LOG"
ls -l "$OUT" >> "$LOG"
