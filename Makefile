# Two commands that work on a fresh machine from a clean clone:
#   make demo   set up .venv, then run the tiny built-in pipeline stock and CFG-parallel on 2 local processes
#   make test   set up .venv, then run the test suite (CPU tier; GPU tiers skip themselves without CUDA)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned, so that no dependency pulls another torch. A pin alone does not keep a CPU-only machine
# from downloading a CUDA build (on PyPI, Linux x86_64 torch wheels are CUDA builds): without an NVIDIA driver
# (no nvidia-smi) torch comes from PyTorch's own CPU-only wheel index, and from the default index where that
# one is unreachable. On a CUDA machine set TORCH_INDEX to the CUDA index you want, or keep the torch already in
# the venv; TORCH_INDEX= (empty) always uses the default index.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,$(TORCH_CPU_INDEX))

.PHONY: demo test lint setup bench clean

$(VENV)/.ready: pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { \
	  if [ -n "$(TORCH_INDEX)" ] && $(PY) -m pip install -q --timeout 20 --retries 1 --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"; \
	  then :; else echo "torch: installing $(TORCH_SPEC) from the default index"; $(PY) -m pip install -q "$(TORCH_SPEC)"; fi; }
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
