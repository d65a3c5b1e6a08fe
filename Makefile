# epp: two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit integration bench-overhead protos clean test-vllm

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py protos/epp/v1/*.proto
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Regenerate epp/v1 from protos/ (the install does this too).
protos: venv
	$(BIN)/python -c "import pathlib, setup" 2>/dev/null || true
	$(BIN)/python -c "from pathlib import Path; import importlib.util as u; s=u.spec_from_file_location('s','setup.py'); m=u.module_from_spec(s); import setuptools; setuptools.setup=lambda **k: None; s.loader.exec_module(m); m.compile_protos(Path('.').resolve())"

demo: venv
	$(BIN)/epp demo

lint: venv
	$(BIN)/ruff check epp tests
	$(BIN)/mypy

test: venv lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench-overhead: venv
	$(BIN)/epp bench overhead --out results/overhead

clean:
	rm -rf $(VENV) build *.egg-info epp/v1/*_pb2*.py epp/v1/*_pb2*.pyi
