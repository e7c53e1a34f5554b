# Two commands matter: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
# pytest workers; tests keep torch at one thread each
JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: help setup system-deps test test-fast viewer-check demo demo-model clean-demo

help:
	@echo "make demo   - set up and run the main job end to end on phantom data"
	@echo "make test   - set up and run the test suite"
	@echo "make test-fast - the tests without the trained model, real servers or PixelMed (edit-test loop)"
	@echo "make viewer-check - show the node's SEG and SR in the OHIF viewer (headless Chromium) and check them"

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU build of this exact version; a bare requirement would pull CUDA
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIP) install --disable-pip-version-check -q -e '.[dev,postgres]'
	touch $(STAMP)

system-deps:
	bash scripts/ensure-system-deps

setup: $(STAMP) system-deps

# The node's SEG and SR of a phantom knee in OHIF 3.13 (Orthanc + headless Chromium, all on
# loopback); screenshots and logs in $(VIEWER_ARTIFACTS). See tests/viewer/viewer_check.py.
VIEWER_ARTIFACTS ?= viewer-artifacts
viewer-check: setup
	$(PY) tests/viewer/viewer_check.py --artifacts $(VIEWER_ARTIFACTS)

test: setup
	$(VENV)/bin/pytest -n $(JOBS) --durations=15 $(PYTEST_ARGS)

# the edit-test loop: tests marked slow (tests/conftest.py) are left out; make test runs all
test-fast: setup
	$(VENV)/bin/pytest -n $(JOBS) -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/orthonode -v demo --work demo-output

clean-demo:
	rm -rf demo-output
