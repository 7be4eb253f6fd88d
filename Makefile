# Two entry points (see README): `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, on its own line, so a machine with a local wheel (or a CPU index via PIP_EXTRA_INDEX_URL) uses it.
# Quoted: an unquoted `torch>=2.10` is a shell redirection (it would install any torch and write a file "=2.10").
# torch >= 2.10: weights_only=True loading can be bypassed below it (CVE-2025-32434, CVE-2026-24747).
TORCH_PKGS ?= "torch>=2.10" "torchvision>=0.25"

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/vitprobe demo

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2 --durations=15

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
