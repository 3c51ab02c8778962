"""Session-wide fixtures: the S3 stores every S3 test runs against (moto's server and Ceph RGW).

`store` is one fixture with two parameters, so each S3 test runs once per store. Ceph RGW is started
once per session: an already-running gateway named by IMGPIPE_TEST_CEPH_ENDPOINT (with
IMGPIPE_TEST_CEPH_ACCESS_KEY and IMGPIPE_TEST_CEPH_SECRET_KEY), else one this session starts with
ceph-rgw-up.sh and stops at the end. Ceph is required: if it cannot start, its tests fail (they are
not skipped). IMGPIPE_TEST_CEPH=off is the one explicit way to leave it out; its tests then show as
skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import CephRGW, MotoServer, RangeHTTPServer, S3Store

STORES = ("moto", "ceph")


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("qemu-img") is None:
        raise pytest.UsageError("qemu-img is the test oracle: install qemu-utils (make test does it as root)")
    if _ceph_mode() not in ("require", "off"):
        raise pytest.UsageError("IMGPIPE_TEST_CEPH is 'require' (the default) or 'off'")


def _ceph_mode() -> str:
    return os.environ.get("IMGPIPE_TEST_CEPH", "require").strip().lower()


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephRGW]:
    endpoint = os.environ.get("IMGPIPE_TEST_CEPH_ENDPOINT") or None
    if endpoint is None and _ceph_mode() == "off":
        pytest.skip("Ceph RGW left out on request (IMGPIPE_TEST_CEPH=off)")
    rgw = CephRGW(
        endpoint,
        os.environ.get("IMGPIPE_TEST_CEPH_ACCESS_KEY"),
        os.environ.get("IMGPIPE_TEST_CEPH_SECRET_KEY"),
    )
    try:
        rgw.start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"Ceph RGW is required and could not start: {exc}", pytrace=False)
    except Exception as exc:  # botocore: the endpoint answered, but not to a signed ListBuckets
        pytest.fail(f"Ceph RGW is required and does not answer signed requests: {exc}", pytrace=False)
    try:
        yield rgw
    finally:
        rgw.stop()


@pytest.fixture(scope="session", params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[S3Store]:
    """The S3 store under test: moto's server, then Ceph RGW (each started once per session)."""
    if request.param == "moto":
        with MotoServer() as moto:
            yield moto
    else:
        yield request.getfixturevalue("ceph")


@pytest.fixture
def bucket(store: S3Store) -> Iterator[str]:
    """A fresh bucket of its own (stores are shared by the whole session), emptied and removed after."""
    name = store.new_bucket()
    yield name
    store.remove_bucket(name)


@pytest.fixture
def http(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    """An HTTP server with Range support serving tmp_path/www (see servers.RangeHTTPServer for its
    fault-injecting paths, e.g. /norange/NAME)."""
    root = tmp_path / "www"
    root.mkdir()
    with RangeHTTPServer(root) as s:
        yield s
