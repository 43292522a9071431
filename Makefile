# One command sets up everything: `make install` (implied by the others) creates ./.venv and
# installs the project with the CPU or the GPU build of vLLM, whichever this machine can run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench

install: $(STAMP)

# The CPU wheels pull CUDA builds of torchvision & co. that break `from vllm import LLM`
# (operator torchvision::nms does not exist); nothing on our path needs them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -e ".[gpu,dev]"; \
	else \
		$(BIN)/python -m pip install -e ".[cpu,dev]" && \
		$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q --durations=12

serve: install
	$(BIN)/llamagen serve $(ARGS)

bench: install
	$(BIN)/llamagen bench offline $(ARGS)
