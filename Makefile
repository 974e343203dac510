# Two commands matter: `make run` (the demo: Label Studio + this backend) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: venv test lint format run serve bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first, so nothing else can pull a CUDA build of torch.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -c "import torch, transformers; assert '+cpu' in torch.__version__ or not torch.cuda.is_available()"
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

serve: venv
	$(BIN)/python -m backend serve

bench: venv
	$(BIN)/python -m bench.click

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Label Studio E2E tests, Chromium and `make run` (the demo).
include mk/e2e.mk
include mk/deploy.mk
