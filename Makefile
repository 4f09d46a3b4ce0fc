# Every target does its own set-up: a fresh clone needs nothing but python3, git and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.example.toml

.PHONY: run test check bench soak fmt clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/deployd serve -c $(CONFIG)

check: $(STAMP)
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# Debian packages some tests need (installed as root when missing; see scripts/ensure-packages):
# RabbitMQ for the broker tests, Chromium and its driver for the dashboard's browser tests.
TEST_PACKAGES := rabbitmq-server chromium chromium-driver

# Two workers (CI has 2 cores; most of a test is waiting on a daemon's processes), each taking
# a whole file at a time, so a module's shared daemon is started once. PYTEST_XDIST= runs serially.
# The files go out longest first (tests/durations.txt, scripts/file-durations): without
# --no-loadscope-reorder xdist would hand them out by their number of tests instead.
# The 25 slowest tests are listed at the end: the suite is to stay well under 10 minutes.
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP) check
	scripts/ensure-packages $(TEST_PACKAGES)
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_XDIST) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

SOAK_CYCLES ?= 100
SOAK_SEED ?= 1
soak: $(STAMP)
	$(BIN)/python -m tests.soak.soak --cycles $(SOAK_CYCLES) --seed $(SOAK_SEED)

fmt: $(STAMP)
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
