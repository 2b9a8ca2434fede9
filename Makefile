# Set-up is part of every target: a fresh clone needs nothing but `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean-demo

$(BIN)/.promptlesion-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# pip resolves the normal torch stack (runs on the CPU too); never pin a CPU-only torch here.
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.promptlesion-installed

demo: install
	$(BIN)/promptlesion_demo --work-dir demo_output

test: install
	$(BIN)/python -m pytest -q -ra --durations=15

bench: install
	$(BIN)/python benchmarks/bench_loader.py

clean-demo:
	rm -rf demo_output
