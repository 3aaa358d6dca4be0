# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheel of torch unless a CUDA torch is already in the venv (then it is left alone).
TORCH_SPEC ?= torch==2.13.0
export CFLAGS ?= -g0

.PHONY: setup test demo clean nvcc-check

$(VENV)/.stamp-deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "keeping the CUDA torch already installed"; \
	else $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q numpy pybind11 ninja regex tensorboard safetensors tokenizers pytest transformers pyarrow
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.stamp-build

test: setup
	$(PY) -m pytest -q tests

# Compile every CUDA kernel source with plain nvcc (no CUDA torch needed): a syntax error fails here.
NVCC ?= nvcc
NVCC_ARCH ?= sm_80
nvcc-check:
	@tmp=$$(mktemp -d) && for f in csrc/cuda/*.cu; do \
		echo "nvcc -c $$f (-arch=$(NVCC_ARCH))"; \
		$(NVCC) -c -std=c++17 -O3 --use_fast_math -arch=$(NVCC_ARCH) -Icsrc $$f -o $$tmp/$$(basename $$f).o || { rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp

clean:
	rm -rf $(VENV) build *.egg-info megaglot/_C*.so

# The embedded default: a tiny GPT-NeoX at TP=2 x PP=2 on 4 CPU processes over the bundled Korean corpus.
demo: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node 4 examples/pretrain_ko.py
