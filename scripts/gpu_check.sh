#!/usr/bin/env bash
# One-shot validation of the CUDA kernels on a GPU machine (no network), from the repository root:
#
#     OUT=/some/dir bash scripts/gpu_check.sh
#
# Stages (each under `timeout`; a failing stage is reported and the next one still runs):
#   1. nvidia-smi          2. build in place for this GPU only       3. python3 -m fastadapt info
#   4. scripts/cuda_smoke.py: parity of every op and dtype + CE bandwidth vs copy and eager
#   5. CUDA tests (pytest -m cuda)    6. CUDA benchmarks (pytest-benchmark JSON)    7. benchmark table
#   8. compute-sanitizer memcheck over tests/test_cuda_kernels.py, only if time is left
#   9. compute-sanitizer racecheck over the odd-shape path tests, only if time is left
# Everything lands in $OUT: one log per stage, bench_cuda.json, cuda_tests.xml and summary.txt.
# Budget: about 8 minutes in all (GPU_CHECK_BUDGET seconds, default 470).
#
# Benchmarks (stages liger, cuda_bench, cuda_report): Liger-Kernel's cross-entropy runs side by side
# with fastadapt's when its pure-Python wheel is in .whl/ (the GPU machine has no network). Fetch it
# here first, then carry the folder with the run (device tool):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform any -d .whl liger-kernel
#     run(command="OUT=$OUT bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# $OUT/BENCHMARKS_cuda.md (tables with the date and the GPU) and $OUT/plots/ come back for BENCHMARKS.md.
# CUDA_BENCH_BUDGET (seconds of timed rounds per measurement, default 0.3) and CUDA_BENCH_K (pytest -k,
# default: the per-op benchmarks without the size sweeps) size the benchmark stage.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
T0=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

left() { echo $((BUDGET - (SECONDS - T0))); }

# stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND (a bash string) with a time limit, tees its output
# to $OUT/NAME.log, records the exit status; never aborts the script.
stage() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  if ((remaining < 10)); then
    echo "=== [$name] skipped: out of time" | tee -a "$SUMMARY"
    return 0
  fi
  ((limit > remaining)) && limit=$remaining
  echo "=== [$name] $(date +%T) limit ${limit}s: $*"
  local start=$SECONDS
  timeout --kill-after=15 "$limit" bash -c "$*" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  ((rc == 124 || rc == 137)) && status="TIMEOUT"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED"
  echo "=== [$name] rc=$rc ($status) in $((SECONDS - start))s" | tee -a "$SUMMARY"
  return 0
}

stage nvidia_smi 20 "nvidia-smi; nvcc --version || /usr/local/cuda/bin/nvcc --version; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"

# In-place build for this GPU only; the CPU sources compile in parallel with the .cu files.
stage build 260 "TORCH_CUDA_ARCH_LIST='$ARCH' MAX_JOBS=\${MAX_JOBS:-16} FASTADAPT_CUDA=1 $PY setup.py -q build_ext --inplace"

stage info 40 "$PY -m fastadapt info"

stage smoke 90 "$PY scripts/cuda_smoke.py"

stage cuda_tests 180 "$PY -m pytest -q -m cuda tests -p no:cacheprovider -rs --durations=15 --junitxml='$OUT/cuda_tests.xml'"

# Liger-Kernel anchor: install the carried wheel into a private folder and probe it on this Triton;
# the CE benchmark adds impl "liger" only when the probe passes, and the report quotes liger_status.txt.
LIGER_WHL=$(ls .whl/liger_kernel-*.whl 2>/dev/null | head -1)
if [[ -n "$LIGER_WHL" ]]; then
  stage liger 60 "$PY -m pip install -q --no-index --no-deps --target /tmp/liger_site '$LIGER_WHL' && \
    PYTHONPATH=/tmp/liger_site:\$PYTHONPATH $PY benchmarks/bench_alpha_weighted_cross_entropy.py --liger-status | tee '$OUT/liger_status.txt'"
  export PYTHONPATH="/tmp/liger_site:$PYTHONPATH"
else
  echo "Liger-Kernel: not measured (no .whl/liger_kernel-*.whl was carried to this machine)" | tee "$OUT/liger_status.txt"
  echo "=== [liger] skipped: no .whl/liger_kernel-*.whl" | tee -a "$SUMMARY"
fi

stage cuda_bench 240 "BENCH_BUDGET=${CUDA_BENCH_BUDGET:-0.3} $PY -m pytest -q benchmarks -k '${CUDA_BENCH_K:-cuda and not sweep}' -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,iqr,rounds --benchmark-json='$OUT/bench_cuda.json'"

stage bench_table 30 "$PY scripts/bench_table.py '$OUT/bench_cuda.json'"

stage cuda_report 60 "$PY scripts/bench_report.py '$OUT/bench_cuda.json' -o '$OUT/BENCHMARKS_cuda.md' --plots '$OUT/plots' \
  --marker generated-cuda --no-skeleton --title \"Measured results: CUDA, \$(date -u +%F), \$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\" \
  --command 'OUT=... bash scripts/gpu_check.sh  (stage cuda_bench)' --note \"\$(cat '$OUT/liger_status.txt' 2>/dev/null)\""

# Memory checking is slow (each kernel launch is instrumented), so it runs last (memcheck gets 60% of
# the time left, racecheck the rest), on the fast tests
# only, and only with time to spare. The caching allocator hides out-of-bounds accesses inside its
# blocks; PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own allocation.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$SAN" ]] && (($(left) > 60)); then
  stage memcheck $(( ($(left) - 20) * 6 / 10 )) "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SAN' --tool memcheck --leak-check no --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py \
    -k 'not beyond_int32 and not deterministic and not no_host_sync'"
else
  echo "=== [memcheck] skipped (compute-sanitizer: '${SAN:-missing}', $(left)s left)" | tee -a "$SUMMARY"
fi
# racecheck: shared-memory hazards in the block reductions, on the odd-shape path tests only (racecheck
# is slower than memcheck, and those tests cover every kernel variant: row widths, misalignment, dtypes).
if [[ -n "$SAN" ]] && (($(left) > 40)); then
  stage racecheck $(($(left) - 10)) "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SAN' --tool racecheck --racecheck-report all --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py -k 'paths'"
else
  echo "=== [racecheck] skipped (compute-sanitizer: '${SAN:-missing}', $(left)s left)" | tee -a "$SUMMARY"
fi

echo
echo "=== summary ($((SECONDS - T0))s)"
cat "$SUMMARY"
