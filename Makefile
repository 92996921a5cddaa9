# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv on first use from the lock, requirements/dev.txt: every distribution pinned
# exactly (torch 2.13.0 included), so a new release on the index cannot change what runs.
# `make lock` refreshes the lock (requirements/lock.py says how).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test lint lock venv clean

# rnnd itself goes on top with --no-deps and without build isolation: its build backend is the
# locked setuptools, and nothing outside the lock is fetched.
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements/dev.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/rnnd demo --duration 30

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

lock:
	$(PYTHON) requirements/lock.py

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache
