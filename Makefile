# Everything a fresh machine needs, from nothing: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup deps demo test bench clean

$(STAMP): pyproject.toml setup.py csrc/*.c csrc/*.h csrc/build_ffi.py
	@bash tools/debian-deps build
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pyhv demo

deps:
	@bash tools/debian-deps

test: $(STAMP) deps
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info pyhv/_core.* .pytest_cache .benchmarks
