# Sourced on a bare GPU machine, in a copy of this tree that carries .whl,
# .devcache and lmx/v1 (bench/gpu_carry.sh prepares them):
#   source bench/gpu_setup.sh
# Installs the carried wheels into /tmp/site (nothing is fetched), sets
# PYTHONPATH and LMX_CACHE, and checks that every service imports. The
# compile caches (Inductor's and Triton's) go to one fixed folder,
# /tmp/lmx-compile-cache, filled from .devcache/compile-cache.tgz where an
# earlier call brought one back (bench/gpu_suite.sh packs it): the decode
# step's compiles, most of a GPU test call's time, then hit the cache. Should the
# carried transformers not import beside the image's other packages, it
# falls back to the image's own (said in the output).
python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    $(ls .whl/*.whl | grep -v llguidance) 2>&1 | tail -3
# llguidance (constrained decoding) wants glibc 2.31: apart, so that an older
# image still runs everything else.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/llguidance-*.whl 2>&1 \
    | tail -2 || true
export PYTHONPATH=/tmp/site:$PWD LMX_CACHE=$PWD/.devcache/lmx PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/lmx-compile-cache TRITON_CACHE_DIR=/tmp/lmx-compile-cache/triton
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .devcache/compile-cache.tgz ]; then
    tar -xzf .devcache/compile-cache.tgz -C /tmp/lmx-compile-cache 2>/dev/null \
        && echo "compile cache: $(find /tmp/lmx-compile-cache -type f | wc -l) files carried" \
        || echo "compile cache: the carried one did not unpack; compiling afresh" >&2
fi
export LMX_BENCH_COMMIT=${LMX_BENCH_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
_lmx_check='import services.admission.app, services.worker.app, services.kvstore.app, services.front.app, transformers, torch; print("imports ok: torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
if ! python3 -c "$_lmx_check"; then
    echo "the carried transformers does not import here: using the image's" >&2
    rm -rf /tmp/site/transformers* /tmp/site/tokenizers* /tmp/site/huggingface_hub*
    python3 -c "$_lmx_check"
fi
