PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench soak chaos man install clean

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

# The chaos walk for a long while: seed after seed for CHAOS_SECONDS (default
# 600); CHAOS_SEED=N (with the CHAOS_STEPS a failure printed) replays one walk.
CHAOS_SECONDS ?= 600
chaos:
	PYTHON=$(PYTHON) scripts/setup test
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_SEED=$(CHAOS_SEED) CHAOS_STEPS=$(CHAOS_STEPS) \
		$(BIN)/python -m pytest tests/system/test_chaos.py -k test_chaos_for_a_while \
		-o timeout=0 -p no:cacheprovider -s -q

# lazyd(8), made from the same text as `lazyd --help`.
man: lazyd.8
lazyd.8: lazyd/cli.py lazyd/manpage.py
	PYTHON=$(PYTHON) scripts/setup demo
	$(BIN)/python -m lazyd.manpage > $@

# As root: lazyd for every user (pip into the system's Python under PREFIX),
# its man page, and the systemd unit, which stays disabled until you enable it.
PREFIX ?= /usr/local
install: lazyd.8
	$(PYTHON) -m pip install -q --root $(or $(DESTDIR),/) --prefix $(PREFIX) .
	install -D -m 0644 lazyd.8 $(DESTDIR)$(PREFIX)/share/man/man8/lazyd.8
	install -D -m 0644 conf/lazyd.service $(DESTDIR)/etc/systemd/system/lazyd.service

clean:
	rm -rf $(VENV) build *.egg-info lazyd.8
