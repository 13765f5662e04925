# Everything a new machine needs, in a virtualenv at $(VENV).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install run test

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,test]'

run:
	$(PY) -m tools.quickstart

test:
	$(PY) -m pytest -q
