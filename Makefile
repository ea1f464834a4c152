# molm-ds: `make demo` trains the demo job, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist) for two cores; whole modules go to one worker, so a module's fixtures
# are built once, in the order tests/conftest.py collects them (the longest files first, by
# tests/durations.json; `make durations` rewrites it). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: venv test durations demo clean

# The venv is refreshed when pyproject.toml changes. torch goes in first (the CPU wheel here), so
# no dependency can pull the CUDA build; then the project, then its dev extra. For `make test`
# (BUILD_CPU_ADAM=1), DeepSpeed's cpu_adam op is JIT-built in the background while pip installs the dev
# extra (scripts/build_cpu_adam.py; log in $(VENV)/build_cpu_adam.log): the offload tests need it, and
# built inside the suite it held one of the two workers for a minute and a half.
BUILD_CPU_ADAM ?=
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(if $(BUILD_CPU_ADAM),DS_ACCELERATOR=cpu $(PY) scripts/build_cpu_adam.py > $(VENV)/build_cpu_adam.log 2>&1 &)
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The project's modules are byte-compiled before the suite: with PYTHONDONTWRITEBYTECODE set (as on
# the build machine) every launched process compiled the ones it imports again, about 0.2 s of CPU each.
COMPILE := $(PY) -m compileall -q -j 0 molm_ds launch data_prep experiments benchmarks scripts tests > /dev/null

test: BUILD_CPU_ADAM = 1
test: venv
	$(COMPILE)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

durations: BUILD_CPU_ADAM = 1
durations: venv
	$(COMPILE)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--record-durations tests/durations.json $(PYTEST_ARGS)

demo: venv
	DS_ACCELERATOR=cpu PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs/ .pytest_cache
