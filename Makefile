# Two commands matter: `make run` (the demo: Label Studio + this backend) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
export TORCH_INDEX
export PYTHONUNBUFFERED := 1

.PHONY: venv test lint format run serve bench clean

# torch first, from the source that suits this machine (tools/install_torch.sh: PyTorch's CPU
# index, else the registry; the registry's CUDA build where an NVIDIA GPU is; TORCH_INDEX=URL|pypi
# overrides), so no requirement can pull another build of it.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	TORCH_VERSION=$(TORCH_VERSION) bash tools/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .  # the `label-studio-sam2` command
	$(BIN)/python -c "import torch, transformers; assert torch.__version__.split('+')[0] == '$(TORCH_VERSION)', torch.__version__"
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
	$(BIN)/python -m label_studio_sam2 serve

bench: venv
	$(BIN)/python -m bench.click

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Label Studio E2E tests, Chromium and `make run` (the demo).
include mk/e2e.mk
include mk/deploy.mk
include mk/image.mk
