# One command each, on a fresh machine: `make demo` runs the main job end to end, `make test` the tests.
# `make install` (called by both) creates .venv/ with hpcckpt and its dependencies; it is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo demo-local lint test test-fast test-slurm test-pbs bench clean system-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# compat: a .pth naming this directory, instead of the import finder that the default (lenient) editable
	@# mode installs, which every command paid for at startup (~10-40 ms: it imports pathlib, urllib, ...).
	@# Byte-compiled up front: with PYTHONDONTWRITEBYTECODE set, every command would compile what it imports.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m compileall -q hpcckpt
	@touch $@

# Debian packages the build and tests need (gcc for the test programs; bc for the demo's timing).
# Slurm is installed by slurm/local-cluster.sh when a Slurm test first needs it.
system-deps:
	@missing=""; \
	for c in gcc:gcc make:make bc:bc chattr:e2fsprogs setpriv:util-linux; do \
	  command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $$missing || \
	  { $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $$missing; }; \
	fi
	@# sshd, ip, unshare/nsenter for the multi-host tests (simulated hosts in network namespaces)
	@if [ "$$(id -u)" = 0 ]; then sh tests/hosts-deps.sh >/dev/null; fi

# the main job: a batch job on a local Slurm (installed and started by the script) that outlives its wall time
demo: install
	bash examples/demo-batch.sh

# the single-node cycle without a scheduler: launch, checkpoint, kill, restart
demo-local: install
	bash examples/demo.sh

# lint, types and structure (issue 18): ruff, mypy (pyproject.toml), no import cycle, no module over 600 lines
lint: install
	$(VENV)/bin/ruff check hpcckpt tools
	$(VENV)/bin/mypy
	$(PY) tools/check_structure.py

test: install lint
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: install lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slurm: install
	$(PY) -m pytest -q -m slurm $(PYTEST_ARGS)

# PBS is tested against tests/pbs_emulator; with PBS_EXEC pointing at a real OpenPBS/PBS Pro installation the
# same scenario runs there instead (as a user allowed to submit; see tests/pbs_emulator/README.md).
test-pbs: install
	$(PY) -m pytest -q tests/test_pbs_emulator.py tests/test_sched_realistic.py -k pbs $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
