# The two commands a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all zoo sweep

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

sweep: setup  # every text causal-LM type of the installed transformers (slow)
	$(VENV)/bin/autodeploy zoo --all-architectures --report reports/sweep
