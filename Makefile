# Two commands from a fresh clone: `make serve` and `make test` (both install into .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve worker test lint bench
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/prelabel serve

worker: $(STAMP)
	$(VENV)/bin/prelabel worker

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/core_loop.py
