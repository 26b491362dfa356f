# Two commands from a fresh clone: `make serve` and `make test` (both install into .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

# Label Studio (the real server the ML backend tests talk to) in its own environment: its
# pins stay apart from ours. About 1 GB and 80 s, once.
LS_VENV ?= .lsvenv
LS_STAMP := $(LS_VENV)/.installed
LABEL_STUDIO_VERSION := 1.23.2

$(LS_STAMP): tests/labelstudio-constraints.txt
	python3 -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q label-studio==$(LABEL_STUDIO_VERSION) \
		-c tests/labelstudio-constraints.txt
	touch $(LS_STAMP)

.PHONY: install labelstudio serve worker test lint bench
install: $(STAMP)

labelstudio: $(LS_STAMP)

serve: $(STAMP)
	$(VENV)/bin/prelabel serve

worker: $(STAMP)
	$(VENV)/bin/prelabel worker

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) $(LS_STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/core_loop.py
