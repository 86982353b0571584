# Two commands work on a fresh machine with nothing installed:
#   make run    - set up, then run the main job on the built-in defaults
#   make test   - set up, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup prepare run test test-fast drafts clean

# the environment takes about 2.3 GB (torch, jaxlib, transformers, pyarrow, scipy, ...) plus pip's temporaries:
# check the disk first, so a full one is one clear line instead of pip's OSError halfway through
$(STAMP): pyproject.toml
	@$(PY) -c "import os, shutil, sys; d = os.path.dirname(os.path.abspath('$(VENV)')); f = shutil.disk_usage(d).free / 2**30; sys.exit(0 if f >= 3 else f'setup: {f:.1f} GB free under {d}, the environment needs about 3 GB (2.3 GB installed plus pip temporaries); free some space or make VENV=<path on a larger disk>')"
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
