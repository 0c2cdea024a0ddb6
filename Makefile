# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-engine test-comfy bench-quality bench-speed clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m benchmarks.demo --out out/demo

test: setup
	$(PY) -m pytest -q tests

bench-quality: setup
	$(PY) -m benchmarks.quality --out out/quality

bench-speed: setup
	$(PY) -m benchmarks.speed --out out/speed

clean:
	rm -rf out .pytest_cache
