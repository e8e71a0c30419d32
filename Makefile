# Two commands on a fresh machine: `make demo` (main job) and `make test` (tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test lint clean

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
	$(BIN)/ruff check gipo tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check gipo tests benchmarks

clean:
	rm -rf runs .pytest_cache
