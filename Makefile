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
	$(PY) -m elalora demo

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

# On a CUDA machine: the GPU tests, then benchmarks/gpu.py (checks + timings), writing
# benchmarks/gpu_results.json and benchmarks/gpu_results.md (< 8 min on an H200).
# GPU_CHECK_ARGS=--smoke runs the benchmark's tiny interpreter version on CPU (CI).
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(PY) -m pytest tests/triton tests/test_autocast.py -q $(PYTEST_ARGS)
	$(PY) benchmarks/gpu.py --json benchmarks/gpu_results.json --table benchmarks/gpu_results.md $(GPU_CHECK_ARGS)

# Also the compiled extensions that the editable install put next to the sources.
clean:
	rm -rf build dist *.egg-info elalora_kernels/_C*.so elalora_kernels/_C*.pyd $(VENV)
