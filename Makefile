# One-command set-up: `make demo` and `make test` create .venv, install, and run.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; override for another CUDA/CPU build,
# e.g. make test TORCH_PKGS="torch torchvision".
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
PIP = $(VENV)/bin/python -m pip
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install browser demo test test-all test-fast test-faults bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PKGS)
	$(PIP) install --quiet -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/patchscope demo --out $(DEMO_OUT)

# Headless Chromium for the report's browser tests (tests/analysis/test_report_browser.py). No test installs
# system packages: this target does, with apt-get as root (Debian/Ubuntu), and fails saying why where it cannot.
# The test targets run it first only where PATCHSCOPE_INSTALL_BROWSER=1 (.ci/run sets it); elsewhere, without
# a Chromium on PATH, the browser tests skip and name this target.
CHROMIUM_PKG ?= chromium
BROWSER_PREREQ := $(if $(filter 1,$(PATCHSCOPE_INSTALL_BROWSER)),browser)

browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "browser: $$(command -v chromium || command -v chromium-browser)"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: cannot install $(CHROMIUM_PKG): it takes root and apt-get; install a Chromium" \
			"(chromium or chromium-browser on PATH) another way, or the browser tests skip" >&2; \
		exit 1; \
	else \
		echo "browser: apt-get install $(CHROMIUM_PKG)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PKG) >/dev/null && \
		{ command -v chromium || command -v chromium-browser; } || \
		{ echo "make browser: $(CHROMIUM_PKG) installed no chromium on PATH" >&2; exit 1; }; \
	fi

# `make test` (what CI runs) is the whole suite, the slow end-to-end tests included (about 5 min on
# two cores) but for the full SIGKILL matrix (marker `faults`, deselected in pyproject's addopts); test-all
# runs everything, that matrix included; test-fast skips the slow tests.
test: install $(BROWSER_PREREQ)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-all: install $(BROWSER_PREREQ)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "slow or not slow or faults"

# The full SIGKILL-and-resume matrix alone (tests/test_faults_sigkill.py, marker `faults`; addopts deselects it
# from `make test`, which runs its fast subset).
test-faults: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m faults tests/test_faults_sigkill.py

test-fast: install $(BROWSER_PREREQ)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow and not faults"

# `make bench BENCH_ARGS="--device cuda --json bench.json"`: every workload, one table (benchmarks/run.py --help).
BENCH_ARGS ?=
bench: install
	$(VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
