# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest torture bench bench-quick bench-pg-1m clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asyncbatch demo --dir demo --files 3000

lint: $(STAMP)
	$(BIN)/ruff check asyncbatch tests examples benchmarks
	$(BIN)/ruff format --check asyncbatch tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

torture: $(STAMP)
	ASYNCBATCH_TORTURE=1 $(BIN)/python -m pytest -q -m slow tests

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run --quick

# PostgreSQL at a million files, once (opt-in: longer than the rest of `make bench`), beside
# SQLite's rows of the same run; written to its own file so RESULTS.md stays the full suite's.
bench-pg-1m: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run --sizes 1000000 --repeat 1 --systems asyncbatch,postgres \
		--pg-max 1000000 --out benchmarks/RESULTS-pg-1m.md --plot benchmarks/throughput-pg-1m.png

clean:
	rm -rf $(VENV) demo .mypy_cache .ruff_cache .pytest_cache
