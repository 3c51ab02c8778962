# imgpipe developer entry points. `make install` builds .venv; `make test` runs the suite; `make run` converts a sample.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install test lint typecheck run bench clean qemu-utils ceph-tools

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# qemu-img is the test oracle (check, compare), never a runtime dependency; genisoimage builds ISOs.
TEST_TOOLS := qemu-img:qemu-utils genisoimage:genisoimage
qemu-utils:
	@missing=""; for t in $(TEST_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing test tools:$$missing (install them; qemu-img is the tests' oracle)"; exit 1; fi; fi

# Every S3 test also runs against Ceph RADOS Gateway, which the test session starts itself (ceph-rgw-up.sh,
# ~6 s) unless IMGPIPE_TEST_CEPH_ENDPOINT names a running one. Its Debian packages are installed here, as
# root, so that start stays inside a test's timeout. IMGPIPE_TEST_CEPH=off leaves Ceph out (its tests are
# then reported as skipped); otherwise a Ceph that cannot start fails the run.
CEPH_TOOLS := ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common uuidgen:uuid-runtime curl:curl
ceph-tools:
	@if [ "$${IMGPIPE_TEST_CEPH:-require}" = off ] || [ -n "$${IMGPIPE_TEST_CEPH_ENDPOINT:-}" ]; then exit 0; fi; \
	missing=""; for t in $(CEPH_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Ceph packages:$$missing (install them as root, set IMGPIPE_TEST_CEPH_ENDPOINT to a running" \
	    "Ceph RGW, or IMGPIPE_TEST_CEPH=off to leave Ceph out)"; exit 1; fi; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests
	$(VENV)/bin/ruff format --check pipeline tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) qemu-utils ceph-tools lint typecheck
	$(VENV)/bin/pytest -q

run: $(STAMP)
	$(VPY) -m pipeline.demo

# The benchmark also needs nginx (the HTTP source) and curl (the download-then-convert peer); its S3 rows run
# on moto and on Ceph RGW (BENCH_ARGS=--no-ceph for moto only).
bench: $(STAMP) qemu-utils ceph-tools
	@command -v nginx >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || { \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light curl >/dev/null; }
	@# Bytecode as an installed wheel has it: with PYTHONDONTWRITEBYTECODE set (as on the development
	@# machines) every run would compile the package from source again, ~80 ms of each start-up.
	$(VPY) -m compileall -q pipeline
	$(VPY) tests/bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
