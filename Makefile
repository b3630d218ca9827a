# One-command set-up: `make demo` and `make test` create .venv, install, and run.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; override for another CUDA/CPU build,
# e.g. make test TORCH_PKGS="torch torchvision".
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
PIP = $(VENV)/bin/python -m pip
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install demo test test-all test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PKGS)
	$(PIP) install --quiet -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/patchscope demo --out $(DEMO_OUT)

# `make test` (what CI runs) is the whole suite, the slow end-to-end tests included (about 5 min on
# two cores); test-all says so explicitly, whatever addopts may deselect; test-fast skips them.
test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "slow or not slow"

test-fast: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow"

bench: install
	$(VENV)/bin/python benchmarks/bench_classifier.py

clean:
	rm -rf $(VENV) build *.egg-info
