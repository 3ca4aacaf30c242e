# slope_bench — `make run` and `make test` do all the set-up on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: help install run test test-full lint format bench bench-grid bench-step leaderboard reproduce clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install the project + dev tools

run: install  ## the main job: slope 2:4 w4 on resnet18 / digits (embedded data)
	$(PY) run.py $(ARGS)

test: install  ## the test suite without `slow` tests (< 10 min on 2 cores)
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-full: install  ## every test, including the slow end-to-end runs
	$(PY) -m pytest -q $(ARGS)

lint: install  ## ruff lint + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: install  ## who wins: tune (val) -> 10 seeds (test) -> paired comparisons, one worker per core -> experiments/digits_resnet18/VERDICTS.md
	$(PY) -m slope_bench.bench $(ARGS)

bench-grid: install  ## the untuned grid: every method at its defaults, 2:4/1:4 x 4/3/2 bits, 3 seeds -> experiments/digits_resnet18_grid/
	$(PY) -m slope_bench.bench grid $(ARGS)

bench-step: install  ## step time of each method vs dense (resnet18, 8x8 and 32x32) -> experiments/step_time/
	$(PY) -m slope_bench.step_time --size 8 32 --steps 8 --out experiments/step_time $(ARGS)

leaderboard: install  ## gather outputs/ into a leaderboard (csv, md, png, html)
	$(PY) -m slope_bench.leaderboard outputs --out outputs/leaderboard $(ARGS)

reproduce: install  ## paper claims checked on the CPU -> experiments/paper_checks/
	$(PY) -m slope_bench.analysis all --out experiments/paper_checks $(ARGS)

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache
