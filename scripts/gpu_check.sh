#!/usr/bin/env bash
# One-shot validation of the CUDA kernels on a lent GPU machine (no network), from the repository root,
# sized to end within 8 minutes (default budget 470 s) so that one 10-minute device call has margin:
#
#     OUT=/some/dir bash scripts/gpu_check.sh
#
# With the device tool (it sets OUT; .whl/ carries Liger-Kernel's wheel, see "Benchmarks" below):
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# A second call on the still-warm machine reuses the build; GPU_CHECK_ONLY="memcheck racecheck" (say)
# reruns chosen stages. What comes back: $OUT/gpu_check.tar.gz (every log, the JUnit XML, the benchmark
# JSON, bench_table.txt, BENCHMARKS_cuda.md and plots/; tar -xzf it) and $OUT/summary.txt, one line per
# stage: ok / FAILED / TIMEOUT / skipped, seconds, note. The tool returns at most 8 files, so nothing
# else goes to $OUT; the archive is refreshed after every stage, so a call killed at its limit still
# returns everything up to the last finished stage.
#
# Stages, most informative first, each under `timeout` with its own cap trimmed to the budget left (the
# last 20 s are kept for the report and the archive; a stage with under 10 s left is skipped). A stage
# that fails or times out is recorded and the next one runs. Timeouts send SIGINT first, so pytest still
# prints its summary and writes its JUnit XML / benchmark JSON (a cut benchmark file keeps its rows).
#
#   stage              cap  here  H200  reasoning (here: two runs of this script on the 2-core machine
#                                       without a GPU, build skipped: start-up, collection, skips)
#   versions            30   4-5     8  nvidia-smi, nvcc, compute-sanitizer --version/--help, torch import
#                                       (2.0 s here) + CUDA init
#   build              200     -    70  3 .cu files for sm_90 only, timed here one at a time on one core:
#                     (warm)   -     1  alpha_weighted_cross_entropy.cu 51.7 s, alpha_weighted_mse.cu 38.5 s,
#                                       linear_relu.cu 34.2 s; the C++ files 3.5-33 s each (ninja log of the
#                                       last build here). MAX_JOBS=16 compiles all 17 at once: the slowest
#                                       file (~52 s) + link + setup.py (~15 s). Reused, ~0 s, when the hash
#                                       of csrc/ + setup.py + python/torch/arch in build/gpu_check_C.hash
#                                       (kept, like the .so, on a warm machine) matches.
#   smoke               60   3-5    15  scripts/cuda_smoke.py: 72 parity checks, 2 bandwidth probes
#   kernel_tests        90   5-7    20  tests/test_cuda_kernels.py -m "not large": 102 small cases; the
#                                       determinism ones run 10 x (4096x32000 bf16 CE, 4096^2 GEMMs)
#   memcheck           120     7    75  compute-sanitizer memcheck on fastadapt's kernels only, the 25
#                                       `memcheck` cases, every tensor its own cudaMalloc; the unknown is the
#                                       sanitizer's start-up with torch (20-40 s). Here: a stand-in
#                                       compute-sanitizer script around pytest
#   racecheck           75     7    40  racecheck on the 3 `racecheck` cases (one per shared-memory kernel:
#                                       CE rows + finalize, MSE partials + finalize, linear_relu bias sums)
#   cuda_large          90   7-8    20  the 4 `large` cases past 2**31 elements (4-9 GB of bf16 each:
#                                       randn, one kernel pass, chunked float64 references)
#   cuda_tests          90   6-9    35  the per-op parity and determinism files: ~640 small CUDA cases
#   cuda_more          120 18-24    75  every other CUDA case: 1100-4100 of them while tests/test_crosscheck.py
#                                       is being written (its collection imports torch's test DB: 12-16 s of
#                                       the time here); 75 s is for ~4100 small cases
#   liger               30     -     5  installs and probes the carried Liger-Kernel wheel, if any
#   bench_ce            60   6-7    30  CUDA benchmarks without the torch.compile rows (BENCH_COMPILE=0),
#   bench_lce           60     -     -  (fused linear CE, the issue's shapes with Liger's and torch's fused
#                                       linear CE and the GEMM floor beside it: not yet timed anywhere)
#   bench_mse           30   6-7    12  one JSON per file: ~30/12/6/4 rows of ~0.3 s of timed rounds
#   bench_linear_relu   30     6    12  (CUDA_BENCH_BUDGET) plus first call and calibration, after the
#   bench_mlp_step      25   5-6    10  pytest start-up measured here
#   compile_*         rest   5-8     0  torch.compile rows (BENCH_COMPILE=only), cheapest file first, only
#                                       with over 60 s to spare: each row compiles cold (10-30 s), so a fresh
#                                       machine skips them and a warm one has time for one or two files
#   report              60     4     8  merge the JSON, bench_table.py, bench_report.py with plots (3.4 s
#                                       here on the 122 CPU rows of benchmarks/results.json)
#   archive         (each)   0.1     3  tar | gzip -1 after every stage: 0.12 s for 9 MB of logs and JSON
#   total                 86-109   438  H200, fresh machine: under the 470 s budget (8 minutes); a warm one
#                                       (build reused) ~370 s, the rest going to torch.compile rows
#
# Sanitizer verdicts come from the logs, not from exit codes: a stage fails on "ERROR SUMMARY: [1-9]",
# "Invalid __global__", "Race reported" or a racecheck summary with errors, and on a log without any
# summary (the tool did not run: an unsupported device, say). The kernel filter is
# --kernel-name kns=fastadapt (--kernel-regex on an older compute-sanitizer; each option is used only when
# `compute-sanitizer --help` lists it); every fastadapt kernel lives in namespace fastadapt::cuda.
#
# Environment: GPU_CHECK_BUDGET (seconds, default 470), GPU_CHECK_ONLY / GPU_CHECK_SKIP (space-separated
# stage names or globs such as "bench_*"), GPU_CHECK_JOBS (build jobs, default nproc),
# TORCH_CUDA_ARCH_LIST (default 9.0), PYTHON (default python3), CUDA_BENCH_BUDGET (seconds of timed rounds
# per benchmark row, default 0.3), CUDA_BENCH_K (pytest -k for the benchmarks, default cuda).
#
# Benchmarks: Liger-Kernel's cross-entropy runs side by side with fastadapt's when its pure-Python wheel
# is in .whl/ (the GPU machine has no network). Fetch it here first, then carry the folder:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform any -d .whl liger-kernel
# BENCHMARKS_cuda.md (tables with the date and the GPU) and plots/ from the archive go to BENCHMARKS.md.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# torch.use_deterministic_algorithms(True) with cuBLAS needs this before the first GEMM
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
[[ "$PY" == */* && "$PY" != /* ]] && PY=$PWD/$PY  # a relative path must survive a cd
BUDGET=${GPU_CHECK_BUDGET:-470}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
JOBS=${GPU_CHECK_JOBS:-$(nproc)}
RESERVE=20     # seconds kept back for the report and the archive
MIN_STAGE=10   # a stage with less time than this left is skipped
NAME=gpu_check
mkdir -p "$OUT"
WORK_PARENT=$(mktemp -d /tmp/gpu_check.XXXXXX)
WORK=$WORK_PARENT/$NAME
mkdir -p "$WORK/bench"
SUMMARY=$WORK/summary.txt
T0=$SECONDS
: > "$SUMMARY"

left() { echo $((BUDGET - (SECONDS - T0))); }

# The archive is rewritten after every stage (small: logs and JSON), so a kill keeps what finished.
archive() {
  cp "$SUMMARY" "$OUT/summary.txt" 2>/dev/null
  tar -I 'gzip -1' -cf "$WORK_PARENT/archive.tmp" -C "$WORK_PARENT" "$NAME" 2>/dev/null &&
    mv -f "$WORK_PARENT/archive.tmp" "$OUT/$NAME.tar.gz"
}

record() {  # record NAME STATUS SECONDS [NOTE]
  printf '%-18s %-8s %4ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"
}

# shellcheck disable=SC2053  # the patterns are globs on purpose
selected() {  # whether stage NAME runs (GPU_CHECK_ONLY / GPU_CHECK_SKIP; "bench_*" style globs)
  local name=$1 pat
  if [[ -n "${GPU_CHECK_ONLY:-}" ]]; then
    local hit=0
    for pat in $GPU_CHECK_ONLY; do [[ "$name" == $pat ]] && hit=1; done
    ((hit)) || return 1
  fi
  for pat in ${GPU_CHECK_SKIP:-}; do [[ "$name" == $pat ]] && return 1; done
  return 0
}

# stage NAME CAP COMMAND: runs COMMAND (a bash string) under `timeout` with min(CAP, time left - RES)
# seconds, its output in $WORK/NAME.log and on stdout; sets STAGE_RC and STAGE_STATUS (ok, FAILED,
# TIMEOUT, skipped) and never aborts the script. The caller records the stage (see finish).
RES=$RESERVE
STAGE_RC=0 STAGE_STATUS=skipped STAGE_START=$SECONDS STAGE_NOTE=""
run_stage() {
  local name=$1 cap=$2
  shift 2
  STAGE_START=$SECONDS STAGE_RC=0 STAGE_NOTE=""
  if ! selected "$name"; then
    STAGE_STATUS=skipped STAGE_NOTE="not selected (GPU_CHECK_ONLY / GPU_CHECK_SKIP)"
    return 1
  fi
  local avail=$(($(left) - RES))
  if ((avail < MIN_STAGE)); then
    STAGE_STATUS=skipped STAGE_NOTE="out of time ($(left)s of the budget left)"
    return 1
  fi
  local limit=$((cap < avail ? cap : avail))
  echo "=== [$name] $(date +%T) limit ${limit}s (cap ${cap}s, $(left)s left): $*"
  # SIGINT first: pytest then still prints its summary and writes the JUnit XML and benchmark JSON
  timeout --signal=INT --kill-after=15 "$limit" bash -c "$*" 2>&1 | tee "$WORK/$name.log"
  STAGE_RC=${PIPESTATUS[0]}
  if ((STAGE_RC == 0)); then
    STAGE_STATUS=ok
  elif ((STAGE_RC == 124 || STAGE_RC == 137)); then
    STAGE_STATUS=TIMEOUT STAGE_NOTE="killed at ${limit}s"
  else
    STAGE_STATUS=FAILED STAGE_NOTE="rc=$STAGE_RC"
  fi
  return 0
}

finish() {  # finish NAME [NOTE]: records the last stage and refreshes the archive
  local note=${2:-$STAGE_NOTE}
  record "$1" "$STAGE_STATUS" $((SECONDS - STAGE_START)) "$note"
  archive
}

stage() {  # stage NAME CAP COMMAND: run_stage + a note from pytest's last summary line + finish
  local name=$1
  run_stage "$@"
  local last=""
  [[ -f "$WORK/$name.log" && "$STAGE_STATUS" != skipped ]] &&
    last=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)|^FAILED: |all parity checks passed|no tests ran' \
      "$WORK/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  local note=$STAGE_NOTE
  [[ -n "$note" && -n "$last" ]] && note+="; "
  finish "$name" "$note$last"
}

PYTEST="$PY -m pytest -q -p no:cacheprovider -rfEs --continue-on-collection-errors"

# ---- 1. versions ------------------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z "$SAN" && -x "$c" ]] && SAN=$c
done
stage versions 30 "nvidia-smi; (command -v nvcc >/dev/null && nvcc --version || /usr/local/cuda/bin/nvcc --version) | tail -2; \
  if [[ -n '$SAN' ]]; then '$SAN' --version; '$SAN' --help > '$WORK/sanitizer_help.txt' 2>&1; else echo 'compute-sanitizer: not found'; fi; \
  $PY -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; \
  $PY -m pip list 2>/dev/null | grep -iE '^(pytest|pytest-benchmark|triton|hypothesis|expecttest|numpy|psutil) '"

# ---- 2. build (skipped when the in-place build is up to date: a warm machine) -----------------------
SO_SUFFIX=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null || echo .so)
SO=fastadapt/_C$SO_SUFFIX
STAMP=build/gpu_check_C.hash  # build/ is git-ignored, so it stays on a warm machine like the .so
SRC_HASH=$({ find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) -print0 |
  LC_ALL=C sort -z | xargs -0 sha256sum; sha256sum setup.py; echo "arch=$ARCH"
  $PY -c 'import sys, importlib.metadata as m; print(sys.version, m.version("torch"))' 2>&1; } | sha256sum | cut -c1-16)
if [[ -f "$SO" && -f "$STAMP" && "$(cat "$STAMP")" == "$SRC_HASH" ]] && selected build; then
  STAGE_START=$SECONDS STAGE_STATUS=ok
  echo "=== [build] $SO is up to date (sources hash $SRC_HASH): reused" | tee "$WORK/build.log"
  finish build "reused: $SO up to date (hash $SRC_HASH)"
else
  stage build 200 "echo 'sources hash $SRC_HASH; no up-to-date $SO'; rm -f '$STAMP'; TORCH_CUDA_ARCH_LIST='$ARCH' MAX_JOBS=$JOBS FASTADAPT_CUDA=1 $PY setup.py -q build_ext --inplace && \
    mkdir -p build && echo '$SRC_HASH' > '$STAMP' && ls -l '$SO'"
fi

# ---- 3. smoke parity --------------------------------------------------------------------------------
stage smoke 60 "$PY scripts/cuda_smoke.py"

# ---- 4. the CUDA kernel tests without the >2**31 cases ------------------------------------------------
stage kernel_tests 90 "$PYTEST tests/test_cuda_kernels.py -m 'not large' --durations=10 --junitxml='$WORK/kernel_tests.xml'"

# ---- 5-6. compute-sanitizer on fastadapt's kernels only ----------------------------------------------
# sanitize NAME CAP ENV TOOL_ARGS PYTEST_ARGS: the verdict comes from the log (see the header).
sanitize() {
  local name=$1 cap=$2 env=$3 tool_args=$4 pytest_args=$5
  if [[ -z "$SAN" ]]; then
    STAGE_START=$SECONDS STAGE_STATUS=skipped
    finish "$name" "compute-sanitizer not found"
    return
  fi
  # options only where this compute-sanitizer lists them (--kernel-regex is the older --kernel-name)
  [[ -s "$WORK/sanitizer_help.txt" ]] || "$SAN" --help > "$WORK/sanitizer_help.txt" 2>&1
  local help=$WORK/sanitizer_help.txt filter="" opts="" o
  if grep -q -- '--kernel-name' "$help"; then
    filter="--kernel-name kns=fastadapt"
  elif grep -q -- '--kernel-regex' "$help"; then
    filter="--kernel-regex kns=fastadapt"
  fi
  for o in "--print-limit 30" "--report-api-errors no"; do
    grep -q -- "${o% *}" "$help" && opts+=" $o"
  done
  run_stage "$name" "$cap" "$env '$SAN' $tool_args $filter$opts $PYTEST $pytest_args" || {
    finish "$name"
    return
  }
  local log=$WORK/$name.log bad summary pytest_line
  bad=$(grep -E 'ERROR SUMMARY: [1-9]|Invalid __global__|Race reported|RACECHECK SUMMARY: [0-9]+ hazards? displayed \([1-9]' \
    "$log" | head -3 | sed 's/^=* *//' | tr '\n' ' ')
  summary=$(grep -E 'ERROR SUMMARY:|RACECHECK SUMMARY:' "$log" | tail -1 | sed 's/^=* *//')
  pytest_line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)' "$log" | tail -1 | tr -d '=' | sed 's/^ *//')
  if [[ -n "$bad" ]]; then
    STAGE_STATUS=FAILED STAGE_NOTE="sanitizer errors: $bad"
  elif [[ -z "$summary" ]]; then
    [[ "$STAGE_STATUS" != TIMEOUT ]] && STAGE_STATUS=FAILED
    STAGE_NOTE="no sanitizer summary (rc=$STAGE_RC): $(grep -m1 -E '^========= (Error|ERROR)|not supported|Unable' "$log" | cut -c1-160)"
  else
    STAGE_STATUS=ok STAGE_NOTE="$summary; pytest rc=$STAGE_RC${pytest_line:+ ($pytest_line)}"
  fi
  finish "$name"
}

# The caching allocator hides out-of-bounds accesses inside its blocks: every tensor its own allocation.
# --report-api-errors no: API errors from torch's own probing are not what is checked here (a failing
# launch of ours raises in the test anyway).
sanitize memcheck 120 "PYTORCH_NO_CUDA_MEMORY_CACHING=1" "--tool memcheck" "tests/test_cuda_kernels.py -m memcheck"
sanitize racecheck 75 "" "--tool racecheck" "tests/test_cuda_kernels.py -m racecheck"

# ---- 7. every other CUDA test, the >2**31 ones included ---------------------------------------------
# Three pytest processes, so that a crash in one (a 4 GB tensor, a sticky CUDA error) cannot take the
# others with it, and a timeout costs only its own stage: the cases past 2**31 elements; the per-op
# parity and determinism files; then every other CUDA test (-k: not the cases of kernel_tests again).
stage cuda_large 90 "$PYTEST tests/test_cuda_kernels.py tests/test_large_index.py \
  tests/test_alpha_weighted_linear_cross_entropy.py -m 'cuda and large' --durations=10 \
  --junitxml='$WORK/cuda_large.xml'"
OP_FILES="" IGNORE_OP_FILES=""
for f in tests/test_alpha_weighted_cross_entropy.py tests/test_alpha_weighted_mse.py tests/test_linear_relu.py \
  tests/test_alpha_weighted_linear_cross_entropy.py tests/test_alpha_weighted_distillation.py tests/test_determinism.py; do
  [[ -f "$f" ]] && OP_FILES+=" $f" IGNORE_OP_FILES+=" --ignore=$f"
done
stage cuda_tests 90 "$PYTEST$OP_FILES -m 'cuda and not large' --durations=10 --junitxml='$WORK/cuda_tests.xml'"
stage cuda_more 120 "$PYTEST tests$IGNORE_OP_FILES -m 'cuda and not large' -k 'not test_cuda_kernels' --durations=10 \
  --junitxml='$WORK/cuda_more.xml'"

# ---- 8. benchmarks: CUDA rows, without torch.compile; one JSON per file --------------------------------
# Liger-Kernel anchor: install the carried wheel into a private folder and probe it on this Triton; the
# CE benchmark adds impl "liger" only when the probe passes, and the report quotes liger_status.txt.
LIGER_WHL=""
for w in .whl/liger_kernel-*.whl; do [[ -f "$w" ]] && LIGER_WHL=$w && break; done
if [[ -n "$LIGER_WHL" ]]; then
  stage liger 30 "$PY -m pip install -q --no-index --no-deps --upgrade --target /tmp/liger_site '$LIGER_WHL' && \
    PYTHONPATH=/tmp/liger_site:\$PYTHONPATH $PY benchmarks/bench_alpha_weighted_cross_entropy.py --liger-status | tee '$WORK/liger_status.txt'"
  export PYTHONPATH="/tmp/liger_site:$PYTHONPATH"
else
  echo "Liger-Kernel: not measured (no .whl/liger_kernel-*.whl was carried to this machine)" | tee "$WORK/liger_status.txt"
  STAGE_START=$SECONDS STAGE_STATUS=skipped
  finish liger "no .whl/liger_kernel-*.whl"
fi

# BENCH_BUDGET sizes the pedantic rows (CE, MSE); --benchmark-max-time the calibrated ones (linear_relu, mlp)
BENCH_TIME=${CUDA_BENCH_BUDGET:-0.3}
BENCH_PYTEST="$PY -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,iqr,rounds \
  --benchmark-max-time=$BENCH_TIME"
BENCH_ENV="BENCH_BUDGET=$BENCH_TIME BENCH_LCE_LARGE=1"  # the linear-CE file's issue shapes: milliseconds here
BENCH_K=${CUDA_BENCH_K:-cuda}
# short name, bench file, cap
BENCHES=("ce alpha_weighted_cross_entropy 60" "lce alpha_weighted_linear_cross_entropy 60" "mse alpha_weighted_mse 30"
  "linear_relu linear_relu 30" "mlp_step mlp_step 25")
for b in "${BENCHES[@]}"; do
  read -r short file cap <<<"$b"
  stage "bench_$short" "$cap" "BENCH_COMPILE=0 $BENCH_ENV $BENCH_PYTEST benchmarks/bench_$file.py -k '$BENCH_K' \
    --benchmark-json='$WORK/bench/$file.json'"
done
# torch.compile rows only with time to spare (cold compiles): cheapest files first
for b in "mlp_step mlp_step" "linear_relu linear_relu" "mse alpha_weighted_mse" "ce alpha_weighted_cross_entropy" \
  "lce alpha_weighted_linear_cross_entropy"; do
  read -r short file <<<"$b"
  if (($(left) - RES < 60)); then
    STAGE_START=$SECONDS STAGE_STATUS=skipped
    finish "compile_$short" "under 60 s left for cold torch.compile rows"
    continue
  fi
  stage "compile_$short" 600 "BENCH_COMPILE=only $BENCH_ENV $BENCH_PYTEST benchmarks/bench_$file.py -k '$BENCH_K' \
    --benchmark-json='$WORK/bench/${file}_compile.json'"
done

# ---- 9. tables and BENCHMARKS_cuda.md from every JSON (the reserve is theirs) --------------------------
RES=3
cat > "$WORK_PARENT/merge_bench.py" <<'EOF'
"""Merges pytest-benchmark JSON files into one (the first file's metadata, every file's benchmarks)."""
import json
import sys

out, paths = sys.argv[1], sys.argv[2:]
merged = None
for path in paths:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"merge_bench: skipping {path}: {exc}")
        continue
    print(f"merge_bench: {path}: {len(data.get('benchmarks', []))} benchmarks")
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data.get("benchmarks", [])
if merged is None:
    sys.exit("merge_bench: no readable benchmark JSON")
with open(out, "w") as f:
    json.dump(merged, f)
EOF
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# run inside the work folder, so that BENCHMARKS_cuda.md names bench_cuda.json and plots/ relatively
stage report 60 "cd '$WORK' && $PY '$WORK_PARENT/merge_bench.py' bench_cuda.json \$(ls bench/*.json 2>/dev/null) && \
  $PY '$PWD/scripts/bench_table.py' bench_cuda.json > bench_table.txt; \
  $PY '$PWD/scripts/bench_report.py' bench_cuda.json -o BENCHMARKS_cuda.md --plots plots \
  --marker generated-cuda --no-skeleton --title 'Measured results: CUDA, $(date -u +%F), ${GPU_NAME:-GPU}' \
  --command 'bash scripts/gpu_check.sh  (stages bench_*: BENCH_COMPILE=0, one JSON per file; compile_*: BENCH_COMPILE=only)' \
  --note \"\$(cat '$WORK/liger_status.txt' 2>/dev/null)\" \
  --note 'torch.compile rows (if any) ran in separate pytest processes after the others (BENCH_COMPILE=only).'"

# ---- summary ------------------------------------------------------------------------------------------
{
  echo "total $((SECONDS - T0))s of a ${BUDGET}s budget; $(date -u '+%F %T') UTC; ${GPU_NAME:-no GPU found}"
} >> "$SUMMARY"
archive
echo
echo "=== summary (stage, status, seconds, note); logs in $OUT/$NAME.tar.gz"
cat "$SUMMARY"
