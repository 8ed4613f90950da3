# cxr-node — make demo | make test | make lint | make bench
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this project is tested with (CPU inference works
# with either; on a GPU host the same wheels use CUDA).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

# tests in parallel (pytest-xdist): most wait on sockets and subprocesses, so more workers
# than cores pays; a test file stays on one worker. TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 6
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup peers test test-fast lint demo bench certs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

peers:
	scripts/install-peers.sh

# the network and integration tiers run twice: with the pynetdicom fast paths (the default)
# and without them (network.fast_paths = false: stock pynetdicom)
test: setup peers
	$(PYTEST)
	CXR_NODE_NETWORK__FAST_PATHS=false $(PYTEST) -m "network or integration"

test-fast: setup
	$(PYTEST) -m "not integration"

lint: setup
	$(VENV)/bin/ruff check node tests scripts
	$(VENV)/bin/mypy

# demo: keeps Orthanc and the node up until Enter (Ctrl-C); CI and scripts:
#   make demo DEMO_ARGS="--no-wait"   (also --image FILE.dcm)
demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

certs:
	scripts/make-test-certs.sh var/certs

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
