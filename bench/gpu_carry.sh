#!/usr/bin/env bash
# What a bare GPU machine needs, beside its own torch, transformers and
# grpcio, to run bench/gpu_suite.sh on a copy of this tree, with nothing to
# fetch there:
#   .whl/       wheels for CPython 3.12 on x86-64 Linux, pinned to this
#               checkout's .venv versions (the generated stubs require the
#               grpcio they were generated for): every package the services
#               import that the GPU image lacks or holds in another version:
#               grpcio, its health checking, reflection and status (which
#               needs googleapis-common-protos for google.rpc), protobuf,
#               structlog, and transformers with its tokenizers and hub
#               client (the versions CI tests the model code with) and what
#               those need that the image lacks (huggingface_hub 2 imports
#               httpx2: without it, on an H100 on 2026-12-06, the carried
#               transformers did not import and gpu_setup.sh fell back to the
#               image's 5.17)
#   .devcache/  the converted smollm2-135m's tokenizer and config, no
#               weights: the synthetic models' tokenizer (the weights are
#               random and built there); and compile-cache.tgz where a
#               gpu_suite.sh call brought one back (copy it there)
# Both are ignored by git. On the GPU machine, before bench/gpu_suite.sh:
#   source bench/gpu_setup.sh    (installs them into /tmp/site, checks that the
#                                 services import, sets PYTHONPATH and LMX_CACHE)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CACHE=${LMX_CACHE:-.cache/lmx}
[ -x "$PY" ] || { echo "run make setup first" >&2; exit 1; }
[ -f "$CACHE/models/smollm2-135m/config.json" ] || {
    echo "no converted smollm2-135m in $CACHE: start it once (make demo, or make test)" >&2; exit 1; }
pins=()
for name in grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf structlog \
        googleapis-common-protos transformers tokenizers huggingface-hub \
        httpx2 httpcore2 truststore hf-xet kernels tomlkit llguidance; do
    pins+=("$name==$("$PY" -m pip show "$name" | awk '/^Version:/ {print $2}')")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
rm -rf .devcache/lmx && mkdir -p .devcache/lmx/models/smollm2-135m   # keeps compile-cache.tgz
find "$CACHE/models/smollm2-135m" -maxdepth 1 -type f ! -name '*.safetensors' \
    -exec cp {} .devcache/lmx/models/smollm2-135m/ \;
du -sh .whl .devcache
echo "carry: .whl .devcache lmx/v1 (the generated stubs)"
