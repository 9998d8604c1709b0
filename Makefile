# make demo: train on the built-in data (no download) and print the metrics table.
# make test: the whole test suite, one file per worker (pytest-xdist), TEST_WORKERS at a time; then the
# `serial` tests (multi-node jobs in network namespaces) alone, so their timeouts measure the code, not the cores.
# Both create .venv when missing: torch first (a CPU build, so nothing pulls a CUDA one), then the package.
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
# A CUDA machine: make TORCH_INDEX=https://download.pytorch.org/whl/cu126 TORCH_SPEC='torch==2.11.*' (README, "GPU")
TORCH_INDEX ?=
VENV ?= .venv
TEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo test install clean gpu-check

$(BIN)/twotower: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[train,scale,stream,test,bench]"
	touch $(BIN)/twotower

install: $(BIN)/twotower

demo: install
	$(BIN)/twotower fit run.name=demo

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "not serial"
	$(BIN)/python -m pytest -q --durations=5 -m serial

# On a CUDA machine: the GPU tier (tests/gpu) and the throughput benchmark on the GPU (README, "GPU").
gpu-check: install
	PYTHON=$(BIN)/python bash bench/gpu_check.sh

clean:
	rm -rf runs data wandb
