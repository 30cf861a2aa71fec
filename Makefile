PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench soak chaos clean

# Both targets build the virtual environment from nothing when it is missing
# and reinstall when pyproject.toml changed since the last install.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/lazyd demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check lazyd tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks

soak: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.soak

# The chaos walk for a long while: seed after seed for CHAOS_SECONDS (default
# 600); CHAOS_SEED=N (with the CHAOS_STEPS a failure printed) replays one walk.
CHAOS_SECONDS ?= 600
chaos: $(VENV)/.installed-test
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_SEED=$(CHAOS_SEED) CHAOS_STEPS=$(CHAOS_STEPS) \
		$(BIN)/python -m pytest tests/test_chaos.py -k test_chaos_for_a_while \
		-o timeout=0 -p no:cacheprovider -s -q

clean:
	rm -rf $(VENV) build *.egg-info
