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

# The Serve page test drives Debian's chromium (root in CI; sudo elsewhere).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

.PHONY: test
# Locally the tests marked slow are skipped; CI (the runner sets CI=true) runs them all. Two pytest-xdist
# workers, each with its own servers and Ray cluster: the suite waits on processes as much as it computes.
SLOW := $(if $(filter true,$(CI)),,-m "not slow")
test: $(VENV)/.installed browser
	@echo "make test: $(if $(SLOW),skipping the tests marked slow (CI=true runs them all),running every test (CI=true))"
	$(VENV)/bin/python -m pytest $(SLOW) -n 2 --durations=25
