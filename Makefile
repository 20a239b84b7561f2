# The README's commands. Each one sets up what it needs first.
.PHONY: setup demo test test-fast lint format bench bench-smoke clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/wsgate demo $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench:
	./scripts/setup.sh --bench
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.admission --out bench/results

bench-smoke:
	./scripts/setup.sh --bench
	$(PY) -m bench --smoke $(ARGS)
	$(PY) -m bench.admission --seconds 0.3 --sizes 4,100 --callers 5

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
