# epp: on a fresh machine, `make demo` and `make test` do all the set-up.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint bench-overhead clean

venv: $(STAMP)

# The install compiles protos/epp/v1/*.proto into epp/v1/ (setup.py build hook).
$(STAMP): pyproject.toml setup.py protos/epp/v1/*.proto
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/epp demo

lint: venv
	$(BIN)/ruff check epp tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench-overhead: venv
	$(BIN)/epp bench overhead --out results/overhead --buffered --grpcio

clean:
	rm -rf $(VENV) build *.egg-info epp/v1/*_pb2*.py epp/v1/__init__.py
