# The two set-up commands of the README. Each builds .venv on first use.
VENV   ?= .venv
PYTHON ?= python3
PIP     = $(VENV)/bin/pip

$(VENV)/.installed: pyproject.toml infra/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c infra/constraints.txt -e '.[dev]'
	touch $@

.PHONY: demo
demo: $(VENV)/.installed
	$(VENV)/bin/jepa-minority demo

.PHONY: test
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest
