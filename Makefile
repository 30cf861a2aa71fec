PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench soak chaos clean

# scripts/setup builds the virtual environment from nothing when it is missing,
# reinstalls when pyproject.toml changed, and (for the tests, as root) installs
# the Debian packages whose programs the tests use as witnesses.
demo:
	PYTHON=$(PYTHON) scripts/setup demo
	$(BIN)/lazyd demo

test:
	PYTHON=$(PYTHON) scripts/setup test
	$(BIN)/python -m pytest

lint:
	PYTHON=$(PYTHON) scripts/setup test
	$(BIN)/ruff check lazyd tests benchmarks
	$(BIN)/mypy

bench:
	PYTHON=$(PYTHON) scripts/setup test
	$(BIN)/python -m benchmarks

soak:
	PYTHON=$(PYTHON) scripts/setup test
	$(BIN)/python -m benchmarks.soak

clean:
	rm -rf $(VENV) build *.egg-info
