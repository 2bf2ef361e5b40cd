# The two commands a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all zoo

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/autodeploy optimize

test: setup
	$(VENV)/bin/pytest -q

test-all: setup
	$(VENV)/bin/pytest -q -m ""

zoo: setup
	$(VENV)/bin/autodeploy zoo --report reports/zoo
