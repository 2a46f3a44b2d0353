# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint system-deps bench dashboards

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the gateway with simulated providers and synthetic traffic
	$(BIN)/metergate demo

test: $(STAMP) system-deps  ## lint, then the whole test suite (Prometheus, PostgreSQL and SDK tests included)
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
