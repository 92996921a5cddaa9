# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv on first use; torch comes from constraints.txt (the CPU build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[export,test,bench]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/rnnd demo --duration 30

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache
