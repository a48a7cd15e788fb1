# The two entry points of the README. Each creates .venv and installs the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this machine's pip offers; GPU users: make TORCH_SPEC='torch>=2.13'
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml

# DeepSpeed's accelerator, which also names the process group's backend: CPU ranks (gloo) where no NVIDIA GPU is
# visible, else DeepSpeed's own choice (CUDA, NCCL). The tests always run on CPU ranks (tests/conftest.py).
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: run test lint install clean gpu-smoke

run: $(VENV)/.installed  ## the whole pipeline on the embedded tiny defaults
	$(VENV)/bin/apt-pipeline run --config $(CONFIG)

# Two workers: a chain leaves a core idle while its driver imports, preps and exports, and many tests wait on
# processes. A file's tests share a worker (the ssh hosts edit /etc/hosts); the workers share one reference chain
# (tests/conftest.py). Not loadgroup: under pytest 9.2 it ignores xdist_group marks (pytest-xdist issue 1386).
test: $(VENV)/.installed lint  ## ruff, then every test (slow ones too), on two pytest-xdist workers
	$(PY) -m pytest -q -n 2 --dist loadfile

gpu-smoke: $(VENV)/.installed  ## the tiny chain on every visible GPU: ZeRO-3/ZeRO-2 x bf16/fp16 (no GPU: says so)
	PYTHON=$(PY) launch/gpu_smoke.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq "$(TORCH_SPEC)"
	$(PY) -m pip install -qq -e ".[dev,eval]"
	touch $@

clean:
	rm -rf $(VENV) .cache runs
