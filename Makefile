# Two commands a new user needs: `make run` (train with DiLoCo on this machine) and `make test`.
VENV        ?= .venv
PYTHON      ?= python3
# Pins torch's version (constraints.txt), not its build: CPU or CUDA is whatever the package index serves for
# that version (PyPI's Linux x86_64 wheels are CUDA builds). `make CONSTRAINTS= ...` installs an unpinned torch.
CONSTRAINTS ?= constraints.txt
EXTRAS      ?= test
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[$(EXTRAS)]'
	touch $@

## Train on this machine: a lighthouse and two CPU replica groups, 6 outer steps of H=50 on the tiny GPT
## (about two minutes on 2 cores); checkpoints in checkpoints/diloco, so a second `make run` resumes there.
RUN_ARGS ?= --outer_steps 6 --sync_every 50 --model tiny --lighthouse_idle_exit 10
run: install
	$(BIN)/torchx run diloco.diloco $(RUN_ARGS)

# Two tests at a time (pytest-xdist). tests/conftest.py keeps the Slurm and network namespace tests, and those sharing
# a module fixture that trains, on one worker. `make test XDIST=` runs them one by one.
XDIST       ?= -n 2 --dist loadgroup

## The whole test suite, the end-to-end tests included (what CI runs).
test: install
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

## Everything but the slow end-to-end tests.
test-fast: install
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not slurm" $(PYTEST_ARGS)

## Lint (ruff), format check (ruff format) and type check (mypy), as CI runs them before the tests; settings in
## pyproject.toml. `ruff check --fix` and `ruff format` (same paths) fix most of what the first two report.
LINT_PATHS ?= torchx_diloco components tests benchmarks scripts
lint:
	$(MAKE) install EXTRAS=test,dev
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy torchx_diloco components

## Quick versions of every benchmark; tables on stdout, JSON and PNG under benchmarks/results/.
bench:
	$(MAKE) install EXTRAS=test,bench
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
