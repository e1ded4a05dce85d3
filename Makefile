# Two commands do all the set-up on a fresh machine:
#   make train   create .venv, install the pinned stack, train the default PiT on the embedded digits
#   make test    create .venv, install the pinned stack, run the test suite (every test, one worker per core)
#   make test-fast   the fast tier: every module, no test marked slow (end-to-end, fault, multi-process)
#   make docs    also install the docs extra, build the documentation site into site/ (strict: warnings fail it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
ARGS   ?=

.PHONY: install train test test-fast docs results-small clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python tools/train.py $(ARGS)

# pytest-xdist: one worker per core; worksteal hands the long tests' neighbours to an idle worker.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(ARGS)

$(DOCS_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m mkdocs build --strict $(ARGS)

# The small suite of experiments (digits, all five findings, 3 seeds where the spread matters) and its report.
# Resumable: run it again after an interruption; finished points are skipped.
results-small: $(STAMP)
	for e in patch_size fixed_tokens pos_embed mae_vs_scratch dit_tokens; do \
		$(BIN)/python tools/sweep.py experiment=$$e scale=small launcher.parallel=2 launcher.threads=1 $(ARGS) || exit 1; \
	done
	$(BIN)/python tools/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache site
