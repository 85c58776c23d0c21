# Set-up is part of every target: a fresh machine with Python 3.11 needs only `make demo` / `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: demo test install
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m cmr_jax.demo --workdir=runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests
