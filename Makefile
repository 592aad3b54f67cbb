# Every target sets up its own virtual environment first, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all install demo test test-unit test-integration lint format typecheck bench serve clean

all: lint typecheck test

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cognigy_offload demo

test: $(STAMP)
	$(PY) -m ruff check cognigy_offload tests
	$(PY) -m mypy
	$(PY) -m pytest tests

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration

lint: $(STAMP)
	$(PY) -m ruff check cognigy_offload tests
	$(PY) -m ruff format --check cognigy_offload tests

format: $(STAMP)
	$(PY) -m ruff format cognigy_offload tests
	$(PY) -m ruff check --fix cognigy_offload tests

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m cognigy_offload bench $(ARGS)

serve: $(STAMP)
	$(PY) -m cognigy_offload serve

clean:
	rm -rf $(VENV) .cognigy_offload .mypy_cache .ruff_cache
