# The README's commands. Each creates .venv if missing, installs torch==2.13.0
# only when no torch is importable there, installs the package, then runs.
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

# On a CUDA machine: the GPU tests, then benchmarks/gpu.py (timings + checks, most important first,
# time-boxed), writing benchmarks/gpu_results.json and .md as results come (target: < 8 min on an H200,
# not yet measured). The benchmark runs even when a test fails; the exit status is non-zero if either did.
# GPU_CHECK_ARGS=--smoke runs the benchmark's tiny interpreter version on CPU (CI; results in the temp dir).
GPU_CHECK_ARGS ?=
GPU_CHECK_TESTS ?= tests/triton tests/test_autocast.py
gpu-check: $(STAMP)
	@tests=0; bench=0; \
	$(PY) -m pytest $(GPU_CHECK_TESTS) -q $(PYTEST_ARGS) || tests=$$?; \
	$(PY) benchmarks/gpu.py $(GPU_CHECK_ARGS) || bench=$$?; \
	echo "gpu-check: tests exit $$tests, benchmark exit $$bench"; \
	test $$tests -eq 0 && test $$bench -eq 0

# Also the compiled extensions that the editable install put next to the sources.
clean:
	rm -rf build dist *.egg-info elalora_kernels/_C*.so elalora_kernels/_C*.pyd $(VENV)
