#!/usr/bin/env bash
# The one prepared benchmark script for a GPU machine (and, at the tiny config, for CPU in the tests).
#
#   bash bench/gpu.sh                      # H200 / H100: paper config (configs/h200.py) + the A6000 config
#   BENCH_CONFIGS="configs/tiny.py" BENCH_STEPS=3 bash bench/gpu.sh   # what the CPU test runs
#
# 1. Installs, from wheels carried in .whl/ (see README "Benchmarks"), whatever this Python lacks.
# 2. Runs `ehrxdiff bench train` and `ehrxdiff bench sample` for each config, with the default XLA flags
#    and, on GPU, once more with the candidate flags of ehrxdiff_jax/xla_flags.py, each run under a
#    timeout so the whole script ends within BENCH_BUDGET_S (default 480 s).
# 3. Writes one JSON (BENCH_OUT, default $OUT/bench.json or bench.json) and prints a table.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BENCH_CONFIGS=${BENCH_CONFIGS:-"configs/h200.py configs/a6000.py"}
BENCH_STEPS=${BENCH_STEPS:-20}
BENCH_SAMPLE_STEPS=${BENCH_SAMPLE_STEPS:-100}
BENCH_SAMPLE_BATCH=${BENCH_SAMPLE_BATCH:-64}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-480}
BENCH_OUT=${BENCH_OUT:-${OUT:-.}/bench.json}
BENCH_CANDIDATES=${BENCH_CANDIDATES:-auto}   # auto: on GPU only
PY=${PYTHON:-python3}
start=$(date +%s)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
platform=$("$PY" -c "import jax; print(jax.default_backend())")
if [ "$BENCH_CANDIDATES" = auto ]; then
  [ "$platform" = gpu ] && BENCH_CANDIDATES=1 || BENCH_CANDIDATES=0
fi
candidates=$("$PY" -c "from ehrxdiff_jax.xla_flags import CANDIDATES; print(' '.join(CANDIDATES.get('$platform', {})))")

tmp=$(mktemp -d)
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  local left=$(( BENCH_BUDGET_S - ($(date +%s) - start) ))
  (( left < 20 )) && { echo "skip $name: budget spent"; return; }
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s)"
  timeout "$limit" "$@" > "$tmp/$name.json" 2> "$tmp/$name.log" || { echo "   failed or timed out; log tail:"; tail -5 "$tmp/$name.log"; }
}
i=0
for cfg in $BENCH_CONFIGS; do
  tag=$(basename "$cfg" .py)
  run "$i-train-$tag" 200 "$PY" -m ehrxdiff_jax.cli bench train --config "$cfg" --steps "$BENCH_STEPS" --json
  run "$i-sample-$tag" 200 "$PY" -m ehrxdiff_jax.cli bench sample --config "$cfg" --batch "$BENCH_SAMPLE_BATCH" \
    --steps "$BENCH_SAMPLE_STEPS" --json
  if [ "$BENCH_CANDIDATES" = 1 ] && [ -n "$candidates" ]; then
    XLA_FLAGS="${XLA_FLAGS:-} $candidates" run "$i-train-$tag-candidate_flags" 200 \
      "$PY" -m ehrxdiff_jax.cli bench train --config "$cfg" --steps "$BENCH_STEPS" --json
  fi
  i=$((i + 1))
done
"$PY" "$ROOT/bench/summarize.py" "$tmp" "$BENCH_OUT"
