# Two commands: `make demo` and `make test`. Each sets up what it needs (system packages, virtualenv) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup system-deps demo test bench lint sandbox-down clean

setup: system-deps $(STAMP)

system-deps:
	@bash deploy/system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/runbook demo

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PY) bench/run_all.py

# ruff (style), import-linter (layer contracts), mypy (types: files and strictness in pyproject.toml [tool.mypy])
lint: setup
	$(VENV)/bin/ruff check runbook flows tasks assessments tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

sandbox-down:
	-$(VENV)/bin/runbook sandbox down

clean: sandbox-down
	rm -rf $(VENV) .pytest_cache .ruff_cache
