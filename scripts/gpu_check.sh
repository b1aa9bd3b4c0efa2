#!/usr/bin/env bash
# On a GPU machine: build the extension, run the test suite (GPU tests included), a
# compute-sanitizer memcheck on a small kernel subset, `python -m titans_cuda --check` and the
# benchmark; end with a short table. Logs go to $OUT (default ./gpu_check_out).
#
#   bash scripts/gpu_check.sh                 # everything
#   SKIP_BENCH=1 bash scripts/gpu_check.sh    # no benchmark
#   TESTS="tests/test_gpu_mlp.py" SKIP_SANITIZER=1 ...   # a subset while iterating
#   PYTEST_K="cluster_split or C64" ...  # pytest -k expression for that subset
#   SKIP_TESTS=1 BENCH_ARGS="--no-sweep" ...                # build + benchmark only
#   SKIP_BUILD=1 ...                     # reuse the extension a previous call installed
#   WHEEL=_wheels/work ...               # install a wheel built here (scripts/device_wheel.sh)
#                                        # instead of building: saves 4-6 min of device time
#   ARCHS=90a-real (default) selects what nvcc compiles; carried wheels in .whl/ (titans-pytorch
#   and its needs) are installed to /tmp/site for the benchmark's baseline.
# The build (~3 min) plus the whole GPU suite (~1500 tests) no longer fit one 600 s device call:
#   PART=1 bash scripts/gpu_check.sh   # build, the chunked (fwd, bwd) and decode tests, --check
#   PART=2 bash scripts/gpu_check.sh   # same warm machine: every other test file, sanitizers,
#                                      # --check, benchmark (SKIP_BENCH=1 to leave it out)
# The sanitizer subsets alone take ~9 min on an H100 (memcheck ~4, racecheck ~5; 2026-11-27), so
# they can run as two calls: SANITIZER=memcheck or SANITIZER=racecheck (default: both), e.g.
#   SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1 SANITIZER=racecheck bash scripts/gpu_check.sh
# On a warm machine whose build folder predates the checkout, `touch csrc/**/*` first: ninja
# keeps objects newer than their (copied) sources.
set -u -o pipefail
cd "$(dirname "$0")/.."
PART1_TESTS="tests/test_gpu_chunked.py tests/test_gpu_chunked_bwd.py tests/test_gpu_chunked_bwd1.py tests/test_gpu_decode.py"
case "${PART:-}" in
  1) SKIP_SANITIZER=1 SKIP_BENCH=1 TESTS=${TESTS:-$PART1_TESTS} ;;
  2) SKIP_BUILD=1
     TESTS=${TESTS:-$(ls tests/test_*.py | grep -v -e test_gpu_chunked.py -e test_gpu_chunked_bwd.py -e test_gpu_chunked_bwd1.py -e test_gpu_decode.py | tr '\n' ' ')} ;;
  "") ;;
  *) echo "PART must be 1 or 2"; exit 2 ;;
esac
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
ARCHS=${ARCHS:-90a-real}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
declare -A status

step() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "build (archs $ARCHS)"
t0=$SECONDS
if [ -n "${SKIP_BUILD:-}" ]; then
  status[build]="skipped (the installed extension)"
elif [ -n "${WHEEL:-}" ]; then  # built off the device (scripts/device_wheel.sh)
  whl=$(ls "$WHEEL"/*.whl 2>/dev/null | head -1); whl=${whl:-$WHEEL}
  if $PY -m pip install --no-deps --force-reinstall "$whl" >"$OUT/build.log" 2>&1; then
    status[build]="installed $(basename "$whl") (built elsewhere)"
  else
    status[build]="FAILED (installing $whl)"; tail -20 "$OUT/build.log"
  fi
elif TITANS_REQUIRE_CUDA=1 TITANS_CUDA_ARCHS="$ARCHS" TITANS_PTXAS_VERBOSE=1 \
   $PY -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  status[build]="ok ($((SECONDS - t0)) s)"
else
  status[build]="FAILED"; tail -40 "$OUT/build.log"
fi
[ -s "$OUT/build.log" ] && grep -E "ptxas info *: (Used|Compiling)|spill" "$OUT/build.log" | sed 's/^ *//' | sort -u | head -20
SO=$($PY -c "import titans_cuda, glob, os; print(glob.glob(os.path.join(os.path.dirname(titans_cuda.__file__), '_C*.so'))[0])" 2>/dev/null)
# The SASS listing (~90 s of cuobjdump for the whole extension) only after a build or install:
# PART=2 and SKIP_BUILD=1 reuse an extension whose listing an earlier call wrote.
if [ -n "$SO" ] && [ -z "${SKIP_BUILD:-}" ]; then
  { echo "# NEEDED"; readelf -d "$SO" | grep NEEDED; echo "# ELF"; cuobjdump --list-elf "$SO";
    echo "# SASS"; cuobjdump -sass "$SO"; } >"$OUT/sass.txt" 2>&1
  echo "NEEDED: $(readelf -d "$SO" | grep NEEDED | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')"
  echo "SASS memory ops (vector kernel): $(grep -oE '(LDG|STG)[A-Z0-9.]*' "$OUT/sass.txt" | sort | uniq -c | tr '\n' ' ')"
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

export TITANS_EXPECT_EXTENSION=1 TITANS_EXPECT_ARCH=sm_${ARCHS%%-*}
if [ -z "${SKIP_TESTS:-}" ]; then
  step "pytest (all tests, GPU included)"
  XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n ${XDIST_N:-8}"
  $PY -m pytest ${TESTS:-tests} ${PYTEST_K:+-k "$PYTEST_K"} -v -p no:cacheprovider $XDIST -rfE --durations=10 \
    >"$OUT/pytest.log" 2>&1
  status[pytest]="$(tail -1 "$OUT/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
fi

SANITIZER=${SANITIZER:-both}
case "$SANITIZER" in both|memcheck|racecheck) ;; *) echo "SANITIZER: both, memcheck or racecheck"; exit 2 ;; esac
if [ -z "${SKIP_SANITIZER:-}" ] && [ "$SANITIZER" != racecheck ]; then
  step "compute-sanitizer memcheck (kernel subset)"
  SUBSET="tests/test_gpu.py tests/test_gpu_mlp.py tests/test_gpu_decode.py tests/test_gpu_chunked.py"
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest $SUBSET -q \
    -p no:cacheprovider -k "writes_every or strided or side_stream or every_cluster_split and fresh or one_block_per_cta or rows_of_any_layout and (lnb-open-split0 or split-4 or D128-h256-L2-C32 or L1-C64)" \
    >"$OUT/sanitizer.log" 2>&1
  rc=$?
  # the depth-1 fp32 forward (and backward): one CTA's and a cluster's instances, a state, varlen,
  # chunk 128 as sub-chunks with an open chunk
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest tests/test_gpu_chunked.py \
    -q -p no:cacheprovider \
    -k "fp32_depth1 and (D128-h128-L1-C16-float32-gelu-res-lnb-open or D32-h32-L1-C64-float32-silu-res-noln-varlen or D64-h64-L1-C128-float32-gelu-res-lnb-open)" \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  # the fused backward: every checkpoint interval on fresh calls (clusters at the launcher's
  # split), the split over 8 ordinary CTAs (global exchange) with groups recomputed, read
  # "chunk", sub-chunks with either read (chunk 128 with an open chunk; D 128 chunk 128, fp16,
  # varlen)
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest tests/test_gpu_chunked_bwd.py \
    -q -p no:cacheprovider \
    -k "checkpoint_groups and fresh or global_split_is and 4-8 or other_shapes and fresh and bfloat16 or read_chunk_splits and 1-4 or sub_chunks and (D64-C128-h256-bfloat16-open or D128-C128-h128-float16-varlen)" \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  # the depth-1 backward: both reads at D 32 / C 16 (fp16) and D 64 / C 64 with a state; its
  # clusters of 2 and 4 (DSMEM exchanges); D 128 (clusters of 4) with a state and varlen;
  # sub-chunks (chunk 128 at D 64 with a state; D 128, fp32, read "chunk")
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest tests/test_gpu_chunked_bwd1.py \
    -q -p no:cacheprovider \
    -k "matches and (D32-C16-float16 or D64-C64-bfloat16-token-open or D128-C16-bfloat16-chunk-open or D128-C32-bfloat16-chunk-varlen) or forced_splits and not 1] and not long or backward_sub_chunks and (D64-C128-bfloat16-token-open or D128-C128-float32-chunk-open)" \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  status[memcheck]="$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tr '\n' ' ')rc=$rc; $(grep -E 'passed|failed' "$OUT/sanitizer.log" | tail -2 | tr '\n' ' ')"
fi

if [ -z "${SKIP_SANITIZER:-}" ] && [ "$SANITIZER" != memcheck ]; then
  step "compute-sanitizer racecheck (kernel subset)"
  compute-sanitizer --tool racecheck --error-exitcode 3 $PY -m pytest tests/test_gpu_mlp.py -q \
    -p no:cacheprovider -k "writes_every and (C48 or D64-h256 or D16-h16-L1)" >>"$OUT/sanitizer.log" 2>&1
  rc=$?
  compute-sanitizer --tool racecheck --error-exitcode 3 $PY -m pytest tests/test_gpu_decode.py -q \
    -p no:cacheprovider -k "writes_every" >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  compute-sanitizer --tool racecheck --error-exitcode 3 $PY -m pytest tests/test_gpu_chunked.py -q \
    -p no:cacheprovider -k "writes_every or rows_of_any_layout and (D64-h256-L2-C64-bfloat16-silu-res-lnb-open or L1-C64) or fp32_depth1 and (D64-h64-L1-C32-float32-silu-nores-noln-fresh or D128-h128-L1-C64-float32-gelu-res-lnb-open or D128-h128-L1-C128-float32-gelu-res-lnb-open) or matches_reference and (D64-h64-L2-C128-float16-gelu-res-lnb-varlen or D128-h128-L2-C128-bfloat16-gelu-nores-ln-open)" \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  compute-sanitizer --tool racecheck --error-exitcode 3 $PY -m pytest tests/test_gpu_chunked_bwd.py \
    -q -p no:cacheprovider -k "checkpoint_groups and h128-float16-fresh-silu-nores-noln-2 or global_split_is and 4-3 or sub_chunks and D128-C64-h128-bfloat16-fresh" \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  compute-sanitizer --tool racecheck --error-exitcode 3 $PY -m pytest tests/test_gpu_chunked_bwd1.py \
    -q -p no:cacheprovider \
    -k "matches and (D64-C64-bfloat16-token-open or D32-C32-float16-chunk or D128-C32-float16-token-fresh) or forced_splits and (D32-C16 and 2] or D64-C32-float16 and 4])" \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$((rc | $?))
  status[racecheck]="$(grep -E 'RACECHECK SUMMARY' "$OUT/sanitizer.log" | tr '\n' ' ')rc=$rc; $(grep -E 'passed|failed' "$OUT/sanitizer.log" | tail -2 | tr '\n' ' ')"
fi

step "python -m titans_cuda --check"
$PY -m titans_cuda --check 2>&1 | tee /tmp/check.log
status[check]="$(grep -E 'passed, .* failed' /tmp/check.log | tail -1)"

if [ -z "${SKIP_BENCH:-}" ]; then
  step "benchmark"
  $PY benchmarks/run.py --out "$OUT" ${BENCH_ARGS:-} 2>/tmp/bench.err
  status[bench]="$( [ -s "$OUT/bench.json" ] && echo "bench.json written" || echo FAILED)"
  grep -v "it/s\]" /tmp/bench.err | tail -5
fi

step "summary"
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  for k in build pytest memcheck racecheck check bench; do
    if [ -n "${status[$k]:-}" ]; then printf '%-9s %s\n' "$k" "${status[$k]}"; fi
  done
} | tee "$OUT/summary.txt"
