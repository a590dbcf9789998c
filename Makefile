# Quickstart: `make demo` (set up + run the main job on the built-in demo pair), `make test` (set up + run the tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean
setup: $(BIN)/spec-export

$(BIN)/spec-export: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (an unpinned torch pulls several GB of CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,dev]"
	touch $@

demo: setup
	$(BIN)/spec-export demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .specedge-demo
