#!/usr/bin/env bash
# Every GPU test and benchmark, in stages that each end within ten minutes on
# an H100/H200, most important first. Run from the repository root on the GPU
# machine, with the project importable (make setup, or PYTHONPATH):
#
#   bench/gpu_suite.sh tests     # pytest -m gpu tests/gpu (first real CUDA-graph capture)
#   bench/gpu_suite.sh speed     # issue 9: decode speed, graphs on and off, and a profile
#   bench/gpu_suite.sh seed      # issue 5: the seed scenario at an 8 GiB cap
#   bench/gpu_suite.sh stream    # issue 7: layer streaming against the link bound
#   bench/gpu_suite.sh all       # all of the above (about 35 minutes)
#
# On a bare machine with nothing to fetch, first bench/gpu_carry.sh here (it
# says what to carry and what to run there). Results go to bench/results as
# usual; one tarball of the new results and every log goes to $OUT (default
# bench/results/logs): one file, as a lent machine sends back only a few. Each
# step has its own time limit, so a step that hangs costs its limit, not the
# stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/logs}
mkdir -p "$OUT"
stamp=$(date -u +%Y-%m-%d)
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
export LMX_BENCH_COMMIT=${LMX_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
marker=$(mktemp)

step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 15 "$LOGS/$name.log"
}

tests() {
    step gpu-tests-$stamp 420 $PY -m pytest -q -m gpu tests/gpu -x -p no:cacheprovider
}

speed() {
    for m in synthetic:llama-1b synthetic:smollm2-135m synthetic:gemma3-270m; do
        step "worker-${m#synthetic:}-$stamp" 150 $PY bench/worker.py --device cuda --model "$m" \
            --sessions 1,8,32,64 --tokens 128 --repeats 3 --quiet-wait-s 0
    done
    step "worker-llama-1b-eager-$stamp" 90 $PY bench/worker.py --device cuda --model synthetic:llama-1b \
        --sessions 1,8 --cuda-graphs off --skip-hf --quiet-wait-s 0
    step "profile-llama-1b-$stamp" 60 $PY bench/engine_inprocess.py --model synthetic:llama-1b \
        --device cuda --sessions 1 --profile
}

speed8b() {
    step "worker-llama-8b-$stamp" 540 $PY bench/worker.py --device cuda --model synthetic:llama-8b \
        --sessions 1,8,32,64 --tokens 128 --repeats 2 --quiet-wait-s 0
}

seed() {
    step "seed-scenario-auto-$stamp" 540 $PY bench/seed_scenario.py --device cuda \
        --resident-fraction auto --log-dir "$LOGS"
}

stream() {
    step "layer-stream-$stamp" 540 $PY bench/layer_stream.py --device cuda
}

case "${1:-}" in
    tests|speed|speed8b|seed|stream) "$1" ;;
    all) tests; speed; speed8b; seed; stream ;;
    *) echo "usage: $0 tests|speed|speed8b|seed|stream|all" >&2; exit 2 ;;
esac
find bench/results -maxdepth 1 -name '*.json' -newer "$marker" > "$LOGS/new-results.txt"
tar -czf "$OUT/gpu-suite-$1-$stamp.tgz" -T "$LOGS/new-results.txt" -C "$LOGS" .
rm -rf "$marker" "$LOGS"
echo "results and logs: $OUT/gpu-suite-$1-$stamp.tgz"
tar -tzf "$OUT/gpu-suite-$1-$stamp.tgz" | tr '\n' ' '
echo
