#!/usr/bin/env bash
# The one prepared benchmark script for a GPU machine (and, at a tiny config, for CPU in tests/test_bench.py).
#
#   bash bench/make_wheels.sh     # here, once: the wheels the GPU image lacks, into .whl/ (README "Benchmarks")
#   bash bench/gpu.sh             # there: paper config on an H100 / H200 (configs/h200.py) + the A6000 config
#
# 1. Installs, from the wheels carried in .whl/, what this Python lacks (into /tmp/site).
# 2. Runs `ehrxdiff bench train` and `ehrxdiff bench sample` for each config with the default XLA flags and,
#    on GPU, the training benchmark once more with the candidate flags of ehrxdiff_jax/xla_flags.py. Each run
#    has its own timeout, and the whole script ends within BENCH_BUDGET_S; a failed run is recorded and the
#    next one starts.
# 3. Writes one JSON (BENCH_OUT) with every run's result (or its error and log tail) and prints a table.
#    Exit status 1 when no run gave a result (or the set-up failed), else 0.
#
# Knobs (environment):
#   BENCH_CONFIGS        configs to run                     "configs/h200.py configs/a6000.py"
#   BENCH_STEPS          timed training steps               20
#   BENCH_TRAIN_BATCH    global training batch              the config's train.batch_size
#   BENCH_SAMPLE_STEPS   denoising steps (DDIM)             100
#   BENCH_SAMPLE_BATCH   sampling batch                     64
#   BENCH_OVERRIDES      --config.a.b=v ... for every run   none (the CPU test shrinks the model with them)
#   BENCH_RUN_TIMEOUT_S  limit of one run                   240
#   BENCH_BUDGET_S       limit of the whole script          480
#   BENCH_CANDIDATES     1 / 0 / auto (= on GPU only)       auto
#   BENCH_OUT            the JSON                           $OUT/bench.json, else ./bench.json
#   PYTHON               the interpreter                    python3
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BENCH_CONFIGS=${BENCH_CONFIGS:-"configs/h200.py configs/a6000.py"}
BENCH_STEPS=${BENCH_STEPS:-20}
BENCH_TRAIN_BATCH=${BENCH_TRAIN_BATCH:-}
BENCH_SAMPLE_STEPS=${BENCH_SAMPLE_STEPS:-100}
BENCH_SAMPLE_BATCH=${BENCH_SAMPLE_BATCH:-64}
BENCH_RUN_TIMEOUT_S=${BENCH_RUN_TIMEOUT_S:-240}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-480}
BENCH_OUT=${BENCH_OUT:-${OUT:-.}/bench.json}
BENCH_CANDIDATES=${BENCH_CANDIDATES:-auto}
read -r -a overrides <<< "${BENCH_OVERRIDES:-}"
PY=${PYTHON:-python3}
start=$(date +%s)
die() { echo "bench/gpu.sh: error: $*" >&2; exit 1; }

# What bench/make_wheels.sh carries; installed only where this Python lacks one of them.
if ! "$PY" -c "import ml_collections, grain, array_record, tensorboardX" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 \
    || die "$PY lacks ml_collections/grain/array_record/tensorboardX and .whl/ holds no wheels (bench/make_wheels.sh)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || die "installing .whl/*.whl failed"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
"$PY" -c "import jax, ml_collections; print('jax', jax.__version__, jax.devices())" || die "jax does not start"
platform=$("$PY" -c "import jax; print(jax.default_backend())") || die "jax does not start"
if [ "$BENCH_CANDIDATES" = auto ]; then
  [ "$platform" = gpu ] && BENCH_CANDIDATES=1 || BENCH_CANDIDATES=0
fi
candidates=$("$PY" -c "from ehrxdiff_jax.xla_flags import CANDIDATES
print(' '.join(CANDIDATES.get('$platform', {})))") || die "ehrxdiff_jax does not import"
# The launchers' runtime environment (e.g. XLA_PYTHON_CLIENT_MEM_FRACTION on GPU); a value set by the caller wins.
eval "$("$PY" -c "from ehrxdiff_jax.xla_flags import runtime_env
for k, v in runtime_env('$platform').items(): print(f'export {k}=\"\${{{k}:-{v}}}\"')")" \
  || die "ehrxdiff_jax.xla_flags.runtime_env failed"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() {  # run NAME CMD...: stdout -> NAME.json, stderr -> NAME.log, exit status -> NAME.rc
  local name=$1; shift
  local left=$(( BENCH_BUDGET_S - ($(date +%s) - start) ))
  if (( left < 20 )); then
    echo "== $name: skipped, the time budget is spent"
    echo skipped > "$tmp/$name.rc"
    return
  fi
  local limit=$(( BENCH_RUN_TIMEOUT_S < left ? BENCH_RUN_TIMEOUT_S : left ))
  echo "== $name (timeout ${limit}s)"
  timeout "$limit" "$@" > "$tmp/$name.json" 2> "$tmp/$name.log"
  local rc=$?
  echo "$rc" > "$tmp/$name.rc"
  if (( rc != 0 )); then
    echo "   FAILED (exit status $rc$( (( rc == 124 )) && echo ', timed out')); log tail:"
    tail -5 "$tmp/$name.log" | sed 's/^/   /'
  fi
}
train_batch=()
[ -n "$BENCH_TRAIN_BATCH" ] && train_batch=(--batch "$BENCH_TRAIN_BATCH")
train_cmd() {  # train_cmd CONFIG: the training benchmark's command line, in the array `train`
  train=("$PY" -m ehrxdiff_jax.cli bench train --config "$1" --steps "$BENCH_STEPS" "${train_batch[@]}" --json
         "${overrides[@]}")
}
i=0
for cfg in $BENCH_CONFIGS; do
  tag=$(basename "$cfg" .py)
  train_cmd "$cfg"
  run "$i-train-$tag" "${train[@]}"
  # --warmup 1: the compiling call is the only untimed one (each DDIM-100 call takes seconds).
  run "$i-sample-$tag" "$PY" -m ehrxdiff_jax.cli bench sample --config "$cfg" --batch "$BENCH_SAMPLE_BATCH" \
    --steps "$BENCH_SAMPLE_STEPS" --warmup 1 --json "${overrides[@]}"
  i=$((i + 1))
done
# The candidate flags after every config's own runs, so that a spent budget skips these first.
i=0
for cfg in $BENCH_CONFIGS; do
  if [ "$BENCH_CANDIDATES" = 1 ] && [ -n "$candidates" ]; then
    train_cmd "$cfg"
    XLA_FLAGS="${XLA_FLAGS:-} $candidates" run "$i-train-$(basename "$cfg" .py)-candidate_flags" "${train[@]}"
  fi
  i=$((i + 1))
done
"$PY" "$ROOT/bench/summarize.py" "$tmp" "$BENCH_OUT"
