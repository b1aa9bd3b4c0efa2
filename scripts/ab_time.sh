#!/usr/bin/env bash
# Same-machine A/B of kernel revisions: one device call builds every revision and times them
# interleaved, so each comparison has its baseline on the same card in the same call.
#
#   bash scripts/ab_time.sh prepare main wip/next-latency   # here: git archive each revision
#                                                           # into _ab/<name> (untracked: the
#                                                           # device copy takes it along)
#   bash scripts/ab_time.sh                                 # on the device: build each _ab/*
#                                                           # as a wheel (concurrently), then
#                                                           # time them ROUNDS times, interleaved
#   rm -rf _ab                                              # here, afterwards
# A revision whose wheel an earlier call on the same (warm) machine built is not built again:
# with three or more revisions, ROUNDS=0 in one call builds them, a second call times them.
#
# Environment: ROUNDS (default 2), SHAPES (bwd_time.py's, default "default long short"),
# ARCHS (default 90a-real), OUT (logs; default ./ab_out). The timing script is this checkout's
# benchmarks/bwd_time.py for every revision, so the revisions differ only in their extension.
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
  shift
  [ $# -ge 1 ] || { echo "usage: $0 prepare REV [REV...]"; exit 2; }
  for rev in "$@"; do
    dir="_ab/$(echo "$rev" | tr '/:~^' '____')"
    rm -rf "$dir" && mkdir -p "$dir" && git archive "$rev" | tar -x -C "$dir" || exit 1
    echo "$rev -> $dir ($(git rev-parse --short "$rev"))" | tee "$dir/AB_REV"
  done
  exit 0
fi

OUT=${OUT:-$PWD/ab_out}
mkdir -p "$OUT"
export TITANS_REQUIRE_CUDA=1 TITANS_CUDA_ARCHS=${ARCHS:-90a-real} PIP_NO_INDEX=1 \
  PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
dirs=$(ls -d _ab/*/ 2>/dev/null | sed 's:/$::')
[ -n "$dirs" ] || { echo "no _ab/* trees: run '$0 prepare REV...' first"; exit 2; }
nvidia-smi --query-gpu=name --format=csv,noheader

t0=$SECONDS
for d in $dirs; do
  name=$(basename "$d")
  if ls /tmp/ab_wheels/"$name"/*.whl >/dev/null 2>&1; then  # built by an earlier call here
    echo "$name: reusing $(ls /tmp/ab_wheels/"$name"/*.whl)"; continue
  fi
  (cd "$d" && TITANS_PTXAS_VERBOSE=1 $PY -m pip wheel --no-build-isolation --no-deps -v \
     -w "/tmp/ab_wheels/$name" . >"$OUT/build_$name.log" 2>&1 \
     || { echo "build of $name FAILED"; tail -20 "$OUT/build_$name.log"; }) &
done
wait
echo "builds: $((SECONDS - t0)) s"
for d in $dirs; do
  name=$(basename "$d")
  echo "$name: $(cat "$d/AB_REV" 2>/dev/null)"
  grep -A2 "Compiling entry.*bwd_kernel.*13__nv_bfloat16" "$OUT/build_$name.log" \
    | grep -E "spill" | sed 's/^ */    bwd bf16: /'
done

for round in $(seq "${ROUNDS:-2}"); do
  for d in $dirs; do
    name=$(basename "$d")
    whl=$(ls /tmp/ab_wheels/"$name"/*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] || continue
    $PY -m pip install -q --no-deps --force-reinstall "$whl" || continue
    $PY benchmarks/bwd_time.py 2>&1 | grep -v '^#' | sed "s/^/$name round $round: /" \
      | tee -a "$OUT/times.txt"
  done
done

echo
echo "fwd+bwd ms, per revision and shape (every round):"
awk '{ for (i = 1; i <= NF; ++i) if ($i == "fwd+bwd") { key = $1 " " $4; t[key] = t[key] " " $(i + 1) } }
     END { for (k in t) print "  " k ":" t[k] }' "$OUT/times.txt" | sort
