# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheel of torch unless a CUDA torch is already in the venv (then it is left alone).
TORCH_SPEC ?= torch==2.13.0
export CFLAGS ?= -g0
PACKAGES := numpy pybind11 ninja regex tensorboard safetensors tokenizers tqdm pytest transformers pyarrow
, := ,

.PHONY: setup test demo clean nvcc-check

LOG    := $(VENV)/setup.log
# $(call step,what it does,command): one line "setup: what ... done in N s". pip's and the compiler's
# output goes to $(LOG) (this machine's pip warns about every ignored index location); on failure the
# tail of the log is shown, less those warnings, and make stops with the command's exit status.
step = @printf 'setup: %s ...' "$(1)"; t0=$$(date +%s); \
	if ( $(2) ) >>$(LOG) 2>&1; then echo " done in $$(( $$(date +%s) - t0 )) s"; \
	else rc=$$?; echo " FAILED after $$(( $$(date +%s) - t0 )) s; the end of $(LOG):"; \
	grep -v 'WARNING: Location .* is ignored' $(LOG) | tail -n 40; exit $$rc; fi

$(VENV)/.stamp-deps: Makefile
	@mkdir -p $(VENV) && : > $(LOG)
	$(call step,creating the environment $(VENV),$(PYTHON) -m venv $(VENV) && $(PIP) install -q --upgrade pip)
	$(call step,installing torch ($(TORCH_SPEC) CPU wheel; a CUDA torch already here is kept),\
		$(PY) -c "import torch$(,) sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)")
	$(call step,installing the other packages ($(PACKAGES)),$(PIP) install -q $(PACKAGES))
	@touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(call step,building the C++ extension megaglot._C (takes minutes on 2 cores),\
		$(PIP) install -q --no-build-isolation --no-deps -e .)
	@touch $@

setup: $(VENV)/.stamp-build

test: setup
	$(PY) -m pytest -q tests

# Style and correctness checks configured in pyproject.toml ([tool.ruff]); ruff is installed into the venv on
# first use, so `make lint` needs no set-up step and runs in seconds.
.PHONY: lint
lint:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m ruff --version >/dev/null 2>&1 || { echo "lint: installing ruff"; $(PIP) install -q ruff >$(VENV)/lint-setup.log 2>&1 \
		|| { grep -v 'is ignored' $(VENV)/lint-setup.log | tail -20; exit 1; }; }
	$(PY) -m ruff check .

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
	@if [ -e checkpoints/demo ]; then echo "make demo: starting over (removing the previous demo's checkpoints/demo and runs/demo)"; fi
	@rm -rf checkpoints/demo runs/demo
	$(VENV)/bin/torchrun --standalone --nproc_per_node 4 examples/pretrain_ko.py

# Instruction tuning on CPU: fine-tunes the demo's checkpoint (made first when absent) on the bundled Korean
# questions (examples/data/ko_instruct.jsonl) at TP=2 x PP=2 and answers a held-out one.
.PHONY: sft-demo
sft-demo: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node 4 examples/finetune_ko.py
