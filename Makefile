# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# focus-validator pins numpy<2 and pandas<3: it lives in a venv of its own (tests/focus-validator.txt).
FOCUS_VENV := .venv-focus
FOCUS_STAMP := $(FOCUS_VENV)/.installed

.PHONY: demo test lint system-deps bench dashboards

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(FOCUS_STAMP): tests/focus-validator.txt
	$(PYTHON) -m venv $(FOCUS_VENV)
	$(FOCUS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FOCUS_VENV)/bin/python -m pip install --quiet -r tests/focus-validator.txt
	touch $(FOCUS_STAMP)

demo: $(STAMP)  ## run the gateway with simulated providers and synthetic traffic
	$(BIN)/metergate demo

test: $(STAMP) $(FOCUS_STAMP) system-deps  ## lint, then the whole test suite (Prometheus, PostgreSQL and SDK tests included)
	$(BIN)/ruff check src tests benchmarks deploy
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks deploy
	$(BIN)/ruff format --check src tests benchmarks deploy
	$(BIN)/mypy

system-deps:  ## Debian packages the tests need (Prometheus, promtool, Alertmanager, amtool)
	scripts/install-system-deps.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/gateway_bench.py

dashboards: $(STAMP)  ## regenerate deploy/grafana/dashboards/*.json from deploy/grafana/dashboards.py
	$(BIN)/python deploy/grafana/dashboards.py
	$(BIN)/python deploy/kubernetes/generate_prometheusrule.py
