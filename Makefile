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

# Two pytest-xdist workers, each test file in one worker (its module fixtures built once); the preprocessed
# phantoms and the trained generator are shared between them (tests/conftest.py: shared_folder). Two because the
# suite is sized for a 2-core machine: every nnU-Net training in it already runs 2 augmentation workers.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: install
	$(BIN)/python benchmarks/bench_loader.py

clean-demo:
	rm -rf demo_output
