# mdp_trt: set-up, tests, profiling, pruning, benchmarks.
# Every target installs what it needs into .venv (idempotent; a second run is fast).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

GPU       ?= $(shell $(PY) -m profilers.device_label 2>/dev/null || echo cpu)
MODEL     ?= resnet50
ENGINE    ?= onnxruntime
PRECISION ?= fp32
BATCH     ?= 1
RES       ?= 224
PYTEST_ARGS ?=
DEMO_ARGS ?=
# The GPU validation run uses the GPU machine's own python3 (no .venv: it has no internet there).
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
# Wheels that machine lacks, for CPython 3.12 on x86-64 Linux: only highspy is imported on the
# run's code paths (cvxpy only for MIP solvers other than HiGHS; rich, timm, onnx are there).
GPU_WHEELS ?= highspy==1.16.0

.PHONY: setup test test-all lint typecheck demo probe-host profile bench gpu-check gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench,openvino]'
	# Type stubs only: their dependency on the tensorrt runtime is not wanted for type-checking.
	$(PY) -m pip install -q --no-deps 'tensorrt-stubs>=10'
	touch $(STAMP)

setup: $(STAMP)
	@$(PY) -c "import mdp_common, mdp_trt, profilers, solvers; print('mdp_trt ready:', mdp_trt.__version__)"

test: lint typecheck
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check mdp_common mdp_trt profilers solvers benchmarks tests

# mypy over the packages (tensorrt untyped there), then the engine against TensorRT's stubs.
typecheck: $(STAMP)
	$(PY) -m mypy mdp_common mdp_trt profilers solvers
	$(PY) tests/typecheck_tensorrt.py

demo: $(STAMP)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "could not install dataset-fashion-mnist: the demo runs on synthetic data"; }
	-@$(PY) -m profilers.neighbours --if-missing
	$(PY) -m mdp_trt.demo $(DEMO_ARGS)

# Whether busy neighbour cores slow the thread clock on this CPU (once, on a quiet machine).
probe-host: $(STAMP)
	$(PY) -m profilers.neighbours

profile: $(STAMP)
	$(PY) -m mdp_trt.profile --model $(MODEL) --engine $(ENGINE) --precision $(PRECISION) \
		--batch-size $(BATCH) --resolution $(RES) --gpu $(GPU)

bench: $(STAMP)
	$(PY) -m benchmarks.profiling
	$(PY) -m benchmarks.solver

# Profile, latency model and 2x prune on the torch CUDA engine within 8 minutes; writes
# results.json, results.md and gpu-check.tar.gz to $$OUT (else runs/gpu-check).
# On the CPU: make gpu-check GPU_PYTHON=.venv/bin/python GPU_CHECK_ARGS=--dry-run
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# The wheels gpu-check installs first, into .whl/ (ignored by git).
gpu-wheels: $(STAMP)
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
