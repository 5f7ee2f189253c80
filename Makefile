# Quick start: `make demo` and `make test`. Both build .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python 3.10, the oldest supported version: when an interpreter is found, .venv310 runs the config tests on it
# (tests/test_portability.py); the rest of the suite runs on $(PYTHON).
PYTHON310 ?= $(shell for p in python3.10 $$HOME/.pyenv/versions/3.10*/bin/python3.10; do "$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; done)
VENV310 := .venv310
STAMP310 := $(VENV310)/.installed

.PHONY: setup demo test test-comfyui gpu-check clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(STAMP310): requirements-dev.txt
	@if [ -n "$(PYTHON310)" ]; then \
		$(PYTHON310) -m venv $(VENV310) && \
		$(VENV310)/bin/python -m pip install --quiet pytest==9.2.0 tomli==2.4.1 && touch $(STAMP310); \
	else echo "note: no python3.10 found: the Python 3.10 config tests are skipped"; fi

demo: $(STAMP)
	$(BIN)/ltx2-av-trainer demo --out demo_out

test: $(STAMP) $(STAMP310)
	$(BIN)/python -m pytest -q

# The ComfyUI tier: needs COMFYUI_PATH pointing at a ComfyUI checkout (see README).
test-comfyui: $(STAMP)
	@test -n "$(COMFYUI_PATH)" || { echo "set COMFYUI_PATH to a ComfyUI checkout"; exit 2; }
	$(BIN)/python -m pip install --quiet -r $(COMFYUI_PATH)/requirements.txt -c requirements-dev.txt
	@test -x /usr/bin/chromium || echo "note: /usr/bin/chromium missing: tests/test_browser.py is skipped (apt-get install -y chromium)"
	$(BIN)/python -m pytest -q -m comfyui

# On a CUDA machine: everything the CPU tests cannot check, one table and gpu_check.json (set COMFYUI_PATH to add
# the ComfyUI check). Without CUDA it prints what it would run.
gpu-check: $(STAMP)
	$(BIN)/python -m ltx2_av_trainer.trainer.app.gpu_check --json gpu_check.json

clean:
	rm -rf $(VENV) $(VENV310) demo_out .pytest_cache tests/artifacts
