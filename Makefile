# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean help system-packages

help:
	@echo "make demo   install and run the main job on the synthetic DP1 repository"
	@echo "make test   install with the test extra and run the test suite"
	@echo "make lint   ruff and mypy"
	@echo "make bench  run the benchmarks (writes benchmarks/results/*.json)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,parquet,bench,dev,butler,butler-server,dask,tap,align]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/harvester demo

test: $(STAMP) system-packages
	$(BIN)/pytest -q

# PostgreSQL + pg_sphere and STILTS for the TAP tests: installed from Debian's packages
# when missing and allowed (root); else those tests skip, saying why. Fast when present.
system-packages:
	@bash .ci/system-packages

lint: $(STAMP)
	$(BIN)/ruff check harvester tests benchmarks
	$(BIN)/ruff format --check harvester tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) out data/ecdfs .pytest_cache .mypy_cache .ruff_cache
