# The README's commands. Each creates .venv if missing, installs torch==2.13.0
# only when no torch is importable there, installs the package, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.elalora-installed
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --upgrade setuptools wheel pybind11 ninja
	$(PY) -m pip install --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m elalora demo

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/compare.py

clean:
	rm -rf build *.egg-info $(VENV)
