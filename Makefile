# imgpipe developer entry points. `make install` builds .venv; `make test` runs the suite; `make run` converts a sample.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install test lint typecheck run bench clean qemu-utils

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# qemu-img is the test oracle (check, compare), never a runtime dependency.
qemu-utils:
	@command -v qemu-img >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; \
	  else echo "qemu-img missing: install qemu-utils (the tests use it as their oracle)"; exit 1; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests
	$(VENV)/bin/ruff format --check pipeline tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) qemu-utils lint typecheck
	$(VENV)/bin/pytest -n 0 -q 2>/dev/null || $(VENV)/bin/pytest -q

run: $(STAMP)
	$(VPY) -m pipeline.demo

bench: $(STAMP) qemu-utils
	$(VPY) tests/bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
