# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheel of torch unless a CUDA torch is already in the venv (then it is left alone).
TORCH_SPEC ?= torch==2.13.0
export CFLAGS ?= -g0

.PHONY: setup test demo clean nvcc-check

$(VENV)/.stamp-deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "keeping the CUDA torch already installed"; \
	else $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q numpy pybind11 ninja regex tensorboard safetensors tokenizers pytest transformers
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.stamp-build

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info megaglot/_C*.so
