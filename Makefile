# The README's commands. Each one sets up what it needs first.
.PHONY: setup demo test test-fast test-scenarios test-containers sanitize lint format bench bench-smoke bench-storm image image-base clean

VENV := .venv
PY := $(VENV)/bin/python
# Bounded scenarios that `make test` leaves out and CI runs on their own
# (`make test-scenarios`): the fault suite, the fuzzers, the bench's smoke runs.
SCENARIOS := faults or fuzz or bench

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/wsgate demo $(ARGS)

test: setup
	$(PY) -m pytest -m "not containers and not ($(SCENARIOS))" $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not containers and not slow" $(PYTEST_ARGS)

test-scenarios: setup
	$(PY) -m pytest -m "($(SCENARIOS)) and not containers" $(PYTEST_ARGS)

# The image built and run with podman, the seed topology from the manifests (root, a
# few minutes; `make test` leaves these out).
test-containers: setup
	$(PY) -m pytest -m containers tests/deploy $(PYTEST_ARGS)

# The relay built with ASan and UBSan (-Werror), and the tests that go through it.
sanitize: setup
	./scripts/sanitize.sh

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

bench-storm:
	./scripts/setup.sh --bench
	$(PY) -m bench.storm $(ARGS)

# The container image (docs/deploy.md): `make image BASE=<base image> IMAGE=<name:tag>`.
BASE ?= docker.io/library/python:3.11-slim-bookworm
IMAGE ?= localhost/wsgate:dev
image:
	BASE=$(BASE) IMAGE=$(IMAGE) ./scripts/image.sh image

# A bookworm base made locally with mmdebstrap, for building without any registry.
image-base:
	./scripts/image.sh base localhost/wsgate-base:bookworm

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
