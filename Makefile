# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# `make demo` creates .venv-demo from requirements/demo.txt: the serving side and the embedded
# broker, no torch (the demo serves the bundle that ships in cli/demo_bundle/).
# `make test` (and `make demo-train`, `make venv`) create .venv from the lock, requirements/dev.txt.
# Every distribution is pinned exactly (torch 2.13.0 included), so a new release on the index
# cannot change what runs. `make lock` refreshes the lock (requirements/lock.py says how).
PYTHON    ?= python3
VENV      ?= .venv
DEMO_VENV ?= .venv-demo
BIN       := $(VENV)/bin
PIP       := $(BIN)/python -m pip --disable-pip-version-check
DEMO_PIP  := $(DEMO_VENV)/bin/python -m pip --disable-pip-version-check

.PHONY: demo demo-train demo-venv test test-fast lint lock venv kafka clean

# rnnd itself goes on top with --no-deps and without build isolation: its build backend is the
# locked setuptools, and nothing outside the lock is fetched.
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements/dev.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The demo's venv has no setuptools of the lock's version, so rnnd is built in pip's isolated build
# environment, from the exact setuptools that pyproject.toml's [build-system] names.
$(DEMO_VENV)/.installed: pyproject.toml requirements/demo.txt
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PIP) install --quiet -r requirements/demo.txt
	$(DEMO_PIP) install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Apache Kafka's jars for the tests' second broker (cli/apache_kafka.py): fetched from Maven Central
# once, checked against requirements/kafka/jars.sha256, cached outside the clone; a no-op when cached.
kafka: $(VENV)/.installed
	$(BIN)/python requirements/kafka/fetch.py

demo-venv: $(DEMO_VENV)/.installed

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/rnnd demo --duration 30

# The full path: train the sensors recipe with torch, export it, serve it.
demo-train: $(VENV)/.installed
	$(BIN)/rnnd demo --train --duration 30

test: $(VENV)/.installed kafka
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The edit-and-rerun loop: the `unit` tests only (no broker, no torch, no child process; tests/conftest.py
# marks every test from what it uses). `make test` still runs everything.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m unit

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

lock:
	$(PYTHON) requirements/lock.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) models .pytest_cache .ruff_cache
