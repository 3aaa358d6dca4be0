#!/usr/bin/env bash
# One call on a lent GPU machine: build megaglot._C with CUDA, run the CUDA kernel tests, then the
# given stages. Logs go to $OUT (the device tool brings them back); the built .so too, so a later
# call can carry it in .gpu_build/ instead of rebuilding.
#   bash benchmarks/gpu_session.sh kernels          # CUDA tests + bench_kernels.py
#   bash benchmarks/gpu_session.sh train [args...]  # bench_train.py with args
#   bash benchmarks/gpu_session.sh build            # only build megaglot._C (REBUILD=1 forces it)
#   bash benchmarks/gpu_session.sh all              # CUDA tests, bench_kernels, the bench_train runs of RESULTS.md
set -uo pipefail
OUT=${OUT:-/tmp/megaglot-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CFLAGS=-g0 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage=${1:-kernels}; shift || true

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# The device tool sends the working tree; its .git may be stale, so pass MEGAGLOT_COMMIT=<sha>.
echo "commit ${MEGAGLOT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (git metadata of the device copy)}"

if ls megaglot/_C*.so >/dev/null 2>&1 && [ -z "${REBUILD:-}" ]; then
  echo "using the CUDA build already in megaglot/"
elif ls .gpu_build/_C*.so >/dev/null 2>&1; then
  cp .gpu_build/_C*.so megaglot/ && echo "using the carried CUDA build"
else
  start=$(date +%s)
  $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "built megaglot._C in $(( $(date +%s) - start )) s"
  cp megaglot/_C*.so "$OUT/"
  cuobjdump --dump-resource-usage megaglot/_C*.so 2>/dev/null | grep -E "Function|REG|STACK" \
    | paste - - | sed -E 's/ +/ /g' | cut -c1-220 >"$OUT/resource_usage.txt" || true
fi
$PY -c "from megaglot.kernels import available; a = available(); print(a); assert a['cuda'], 'no CUDA build'" || exit 1

cuda_tests() {
  $PY -m pytest -q -p no:cacheprovider --maxfail=30 tests/test_kernels_cuda.py tests/test_model_cuda.py 2>&1 \
    | tee "$OUT/test_cuda.log" | tail -40
}

case "$stage" in
  kernels)
    cuda_tests
    $PY benchmarks/bench_kernels.py --repeat 50 "$@" 2>&1 | tee "$OUT/bench_kernels.md"
    ;;
  train)
    $PY benchmarks/bench_train.py "$@" 2>&1 | tee "$OUT/bench_train.log"
    ;;
  all)  # everything RESULTS.md records, in one call (about 6 minutes on an H100)
    cuda_tests
    $PY benchmarks/bench_kernels.py --repeat 30 2>&1 | tee "$OUT/bench_kernels.md"
    $PY benchmarks/bench_train.py --micro-batch-size 8,12 --compare hf --iters 8 --warmup 4 2>&1 | tee "$OUT/bench_train_sweep.log"
    $PY benchmarks/bench_train.py --micro-batch-size 12 --global-batch-size 48 --iters 4 --warmup 2 2>&1 | tee "$OUT/bench_train_gbs48.log"
    ;;
  build) ;;  # only the build (and the import check above)
  *) echo "unknown stage $stage"; exit 2 ;;
esac
