# Two commands work on a fresh machine with nothing installed:
#   make run    - set up, then run the main job on the built-in defaults
#   make test   - set up, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup prepare run test test-fast drafts clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,zh]"
	touch $(STAMP)

setup: $(STAMP)

# fetch and convert the assets the defaults need (SmolLM2, essays, HumanEval) into the cache
prepare: $(STAMP)
	$(BIN)/python -m experiments.prepare

run: $(STAMP)
	$(BIN)/python -m experiments.main

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# teacher data, then the undistilled and the TVD-distilled drafts where `python -m experiments.specbench` reads them
drafts: $(STAMP)
	$(BIN)/python -m experiments.extract_teacher
	$(BIN)/python -m experiments.distill_draft distill.steps=0 'export_dir=$${cache_dir}/drafts/smollm2/undistilled'
	$(BIN)/python -m experiments.distill_draft 'export_dir=$${cache_dir}/drafts/smollm2/tvd'

clean:
	rm -rf $(VENV) outputs multirun
