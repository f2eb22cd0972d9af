#!/usr/bin/env bash
# The one prepared device check (docs/kernels.md): on a fresh H100/H200 machine, from the repo root,
# the Triton kernels' tests compiled on the GPU, then bench_cache.py --gpu and bench_train.py --gpu
# (the torch paths and the Triton kernels side by side), both tables printed, in under 8 minutes.
#
#   bash scripts/gpu_check.sh --wheels   # here, on a machine with pip and the registry: fetch the
#                                        # wheels the GPU image lacks into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh            # there: .whl/ carried along (the device tool's carry: [".whl"])
#
# The GPU image has torch, transformers, accelerate, h5py and triton; zarr, numcodecs, omegaconf,
# datasets and what they need come from .whl/. Each step has its own time limit and a failed step
# does not stop the next; the exit status is the number of failed steps. Logs go to $OUT (the
# device tool brings that folder back) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# pinned to what the project's own environment runs (pip list of the dev venv, 2026-12-01)
WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 omegaconf==2.4.0
        antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

if [[ "${1:-}" == "--wheels" ]]; then
  platforms=()
  for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}" || exit 1
  du -sh .whl
  exit 0
fi

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for everything; the device tool's limit is 600 a command
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
FAILED=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME SECONDS COMMAND...: run with at most SECONDS (less if the budget is short), log to $LOGS/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  ((remaining < limit)) && limit=$remaining
  if ((limit < 10)); then
    echo "== $name: skipped, the time budget is spent" | tee -a "$LOGS/summary.txt"
    FAILED=$((FAILED + 1))
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOGS/summary.txt"
  ((rc != 0)) && FAILED=$((FAILED + 1))
}

unset TRITON_INTERPRET  # compiled kernels on the GPU, not the CPU interpreter CI uses
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && SITE=/tmp/site || echo "== installing .whl/ failed; going on with what the image has"
else
  echo "== no .whl/ here: zarr, numcodecs, omegaconf, datasets must already be installed"
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}"

{
  date -u '+%Y-%m-%d %H:%M UTC'
  nvidia-smi -L || true
  python3 - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("triton", "transformers", "accelerate", "h5py", "zarr", "numcodecs", "omegaconf", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - report every package, whatever breaks
        print(name, "FAILS:", repr(err)[:200])
EOF
} 2>&1 | tee "$LOGS/env.log"

# the tests compile a few dozen kernel variants (a CPU-bound minute or two): spread over processes when xdist is there
PARALLEL=()
python3 -c "import xdist" 2>/dev/null && PARALLEL=(-n 6)
step tests 150 python3 -m pytest -q -p no:cacheprovider -rfE "${PARALLEL[@]}" \
  tests/test_triton_fused_loss.py tests/test_triton_extract.py
step bench_cache 120 python3 scripts/bench_cache.py --gpu --repeats 2 --batches 4
step bench_train 190 python3 scripts/bench_train.py --gpu --repeats 1 --steps 2 --warmup 1 \
  --variants hf_ce,fused_kd,triton_kd,fused_sampled,triton_sampled

echo "== gpu_check: $FAILED failed step(s), $(($(date +%s) - START))s in all"
cat "$LOGS/summary.txt"
exit "$FAILED"
