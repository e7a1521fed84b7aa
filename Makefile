# make help: list targets. Every target (re)creates .venv from pyproject.toml when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv train test test-fast lint bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is pinned in pyproject.toml: the CPU wheel, never a multi-GB CUDA build here.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import torch, pytorch_lightning, hydra, wandb"
	touch $(STAMP)

venv: $(STAMP)  ## create/refresh the virtual environment

train: $(STAMP)  ## train IWAE on MNIST with the paper's settings (pass overrides with ARGS="...")
	$(BIN)/python train.py $(ARGS)

# --dist loadscope: a module's tests stay on one worker, so its shared runs (module fixtures)
# are trained once, not once per worker.
test: $(STAMP)  ## run every test layer (CI runs this), one worker per core
	$(BIN)/python -m pytest -q -n auto --dist loadscope $(ARGS)

test-fast: $(STAMP)  ## skip the slow end-to-end and DDP tests
	$(BIN)/python -m pytest -q -m "not slow and not ddp" $(ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

bench: $(STAMP)  ## benchmarks (writes benchmarks/results.*)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
