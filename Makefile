# The README's commands. Each creates .venv if missing, installs torch==2.13.0
# only when no torch is importable there, installs the package, then runs;
# except gpu-check, which installs nothing and runs on the python it is given.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.elalora-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench gpu-check clean

$(STAMP): setup.py pyproject.toml MANIFEST.in $(wildcard csrc/*.cpp csrc/cuda/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --upgrade "setuptools>=77" wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Everything but the slow tests and those that start other processes (wheel build, DDP workers, ...).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not subprocess" $(PYTEST_ARGS)

# The CPU suite under pytest-benchmark (benchmarks/bench_*.py), then the RESULTS.md tables from its JSON.
BENCH_JSON ?= benchmarks/cpu_results.json
bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-json=$(BENCH_JSON) $(PYTEST_ARGS)
	$(PY) benchmarks/compare.py $(BENCH_JSON)

# On a CUDA machine whose python already has CUDA torch and Triton (a cluster node, a cloud image, often
# offline): `make gpu-check PY=python3`. Installs nothing and makes no .venv (PIP_NO_INDEX is set, so
# nothing can reach an index); builds the compiled kernels in place (benchmarks/gpu_build.py, which says
# when nvcc and torch's CUDA disagree and goes on with Triton); clears an inherited TRITON_INTERPRET; runs
# the GPU tests (those that start no other process; skipped with a message if pytest is missing), then
# benchmarks/gpu.py with what is left of GPU_CHECK_SECONDS (timings + checks, most important first, each
# task isolated, results written to benchmarks/gpu_results.json and .md after every task). Estimated from
# the sizes at about 6 minutes on an H100/H200, not yet measured. The benchmark runs even when a test
# fails; the exit status is non-zero if either did. Without PY, the .venv's python if there is one, else
# python3. GPU_CHECK_ARGS=--smoke runs the benchmark's tiny interpreter version on CPU (CI).
GPU_CHECK_ARGS ?=
GPU_CHECK_TESTS ?= tests/triton tests/kernels/test_autocast.py
GPU_CHECK_SECONDS ?= 480
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(if $(filter $(VENV)/bin/python,$(PY)),python3,$(PY)))
gpu-check:
	@export PIP_NO_INDEX=1; unset TRITON_INTERPRET; start=$$(date +%s); tests=0; bench=0; \
	$(GPU_PY) benchmarks/gpu_build.py || exit $$?; \
	if $(GPU_PY) -c "import pytest" 2>/dev/null; then \
		$(GPU_PY) -m pytest $(GPU_CHECK_TESTS) -m "not subprocess" -q -p no:cacheprovider $(PYTEST_ARGS) || tests=$$?; \
	else echo "gpu-check: pytest is not installed for $(GPU_PY): tests skipped (the benchmark checks the kernels)"; fi; \
	left=$$(( $(GPU_CHECK_SECONDS) - $$(date +%s) + start - 60 )); \
	$(GPU_PY) benchmarks/gpu.py --time-limit $$left $(GPU_CHECK_ARGS) || bench=$$?; \
	echo "gpu-check: tests exit $$tests, benchmark exit $$bench"; \
	test $$tests -eq 0 && test $$bench -eq 0

# Also the compiled extensions that the editable install put next to the sources.
clean:
	rm -rf build dist *.egg-info elalora_kernels/_C*.so elalora_kernels/_C*.pyd $(VENV)
