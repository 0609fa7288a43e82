# Two commands that work on a fresh machine from a clean clone:
#   make demo   set up .venv, then run the tiny built-in pipeline stock and CFG-parallel on 2 local processes
#   make test   set up .venv, then run the test suite (CPU tier; GPU tiers skip themselves without CUDA)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned, so no dependency pulls a multi-GB CUDA build by accident on a CPU-only machine.
# On a CUDA machine set TORCH_SPEC to the build you want (or keep the one already installed in the venv).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test lint setup bench clean

$(VENV)/.ready: pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q scikit-build-core pybind11
	# --no-build-isolation: build the extension against the venv's own pybind11, with no second download
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,serve]"
	$(PY) -c "import pycfg; from pycfg.parallel.nccl import unavailable_reason as r; print('pycfg', pycfg.__version__, '| NCCL extension:', r() or 'ready')"
	touch $@

setup: $(VENV)/.ready

demo: $(VENV)/.ready
	$(PY) -m pycfg.demo --out demo.png

test: $(VENV)/.ready
	$(PY) -m pytest -q

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .

bench: $(VENV)/.ready
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build dist *.egg-info demo.png
