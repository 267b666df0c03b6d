# QuantFleet developer entry points. `make demo` and `make test` install what they need themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CACHE  ?= .cache
ASSETS := $(CACHE)/assets
export QF_ASSETS_DIR ?= $(abspath $(ASSETS))

.PHONY: venv assets test test-fast demo serve lint clean quality llama-cpp gguf-quality

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

# llama.cpp itself for the GGUF checks: llama-cpp-python built from its PyPI sdist (CPU build, 375 s on this
# 2-core machine), the wheel cached in .cache/wheels. Not part of `make test`: without it the llama.cpp test of
# tests/workers/test_gguf_export.py is skipped. GGUF quality beside llama.cpp's own quantizer (benchmarks/quality.md).
LLAMA_CPP_VERSION ?= 0.3.36
llama-cpp: venv
	ls $(CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  nice $(PY) -m pip wheel -q --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(CACHE)/wheels
	$(PY) -m pip install -q $(CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl

gguf-quality: llama-cpp assets
	$(PY) benchmarks/gguf_quality.py $(GGUF_ARGS)

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
	$(VENV)/bin/mypy api orchestrator quantfleet workers

clean:
	rm -rf var $(VENV)
