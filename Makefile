# `make demo` and `make test` work on a fresh machine: each creates or reuses .venv,
# installs the project and pulls the default model when needed, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup model browser demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m consortium.model.cpu_kernel
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/consortium model pull

# The status page's browser test needs Chromium and its driver: installed with apt-get where
# that works (CI runs as root on Debian); elsewhere the test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "no Chromium installed: the status page's browser test will skip"

demo: model
	$(BIN)/consortium demo

test: model browser
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: model
	$(BIN)/python benchmarks/bench_single.py --out results/bench_single.json
	$(BIN)/python benchmarks/bench_pipeline.py --out results/bench_pipeline.json
	$(BIN)/python benchmarks/bench_verification.py --out results/bench_verification.json

clean:
	rm -rf $(VENV) .pytest_cache results
