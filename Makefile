# QuantFleet developer entry points. `make demo` and `make test` install what they need themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CACHE  ?= .cache
ASSETS := $(CACHE)/assets
export QF_ASSETS_DIR ?= $(abspath $(ASSETS))

.PHONY: venv assets test test-fast demo serve lint clean quality

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel of torch first, so the range in pyproject.toml does not pull the CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[service,assets,dev]"
	touch $@

venv: $(VENV)/.installed

$(ASSETS)/.ready: $(VENV)/.installed workers/assets.py
	$(PY) -m workers.assets --cache $(ASSETS)
	touch $@

assets: $(ASSETS)/.ready

# Side-by-side quality vs llm-compressor 0.14.0.1 (CPU, hours on 2 cores; creates .cache/llmc-venv itself).
# Results: benchmarks/results/quality-vs-llmcompressor/; e.g. make quality QUALITY_ARGS="--tools quantfleet".
quality: venv assets
	$(PY) benchmarks/quality_vs_llmcompressor.py $(QUALITY_ARGS)

test: venv assets
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

demo: venv assets
	$(PY) -m quantfleet.demo

serve: venv
	$(VENV)/bin/quantfleet serve

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy api orchestrator workers

clean:
	rm -rf var $(VENV)
