"""Real loopback servers for the imgpipe test suite.

Everything here listens on 127.0.0.1 on a port chosen by the kernel and speaks real HTTP over real
sockets, because the product is mostly exercised as a subprocess (the ``imgpipe`` CLI).

* :class:`S3Store` -- what a test needs from an S3 endpoint (URL, keys, environment, client); two kinds:
* :class:`MotoServer` -- moto's S3/SQS server in its own process.
* :class:`CephRGW` -- a real object store: Ceph RADOS Gateway, one already running (endpoint + keys) or one
  started from nothing by ``ceph-rgw-up.sh`` (``../shared/tools``, else the copy in ``.ci/ceph``).
* :class:`RangeHTTPServer` -- a static file server with Range/ETag/If-Match support and fault modes.
* :class:`S3FaultProxy` -- a reverse proxy in front of either store that can inject S3 failures and delays,
  logs requests, and can serve HTTPS (a self-signed certificate) the way real endpoints are reached.

The two aiohttp based servers run their own event loop in a background (daemon) thread, so they can be
used both from synchronous tests and from ``pytest-asyncio`` tests (whose loop is a different one).
All public methods are safe to call from the test thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import boto3
from aiohttp import web
from botocore.config import Config
from multidict import CIMultiDict
from yarl import URL

__all__ = [
    "CephRGW",
    "MotoServer",
    "ProxyRecord",
    "RangeHTTPServer",
    "RequestRecord",
    "S3FaultProxy",
    "S3Store",
    "free_port",
    "s3_error_xml",
]

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

# Hop-by-hop headers (RFC 9110 section 7.6.1): never relayed; each side does its own framing.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def free_port(host: str = LOOPBACK) -> int:
    """Return a port that was free a moment ago (bind to port 0, read it back, close).

    Only for servers we cannot hand a bound socket to (moto runs in another process); there is a small
    race with other processes, which :class:`MotoServer` covers by retrying on a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _http_request(
    host: str, port: int, method: str, path: str, *, timeout: float = 5.0, body: bytes | None = None
) -> tuple[int, bytes]:
    """A tiny HTTP client that never consults *_proxy environment variables (urllib would)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------------
# S3 stores
# --------------------------------------------------------------------------------------------------------


class S3Store:
    """An S3 endpoint the tests run against: moto's server or Ceph RGW, used through the same few calls.

    Subclasses set ``name``, ``access_key``, ``secret_key`` and provide ``endpoint`` and ``config_dir``.
    """

    name = "s3"
    REGION = "us-east-1"
    access_key = ""
    secret_key = ""

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    @property
    def config_dir(self) -> Path:
        raise NotImplementedError

    def env(self, base: Mapping[str, str] | None = None, *, endpoint: str | None = None) -> dict[str, str]:
        """Environment for a subprocess (or botocore) that must talk to this store.

        ``base`` (typically ``os.environ``) is copied with every ``AWS_*``/``BOTO_*`` variable removed (so
        e.g. ``AWS_PROFILE`` or ``AWS_SESSION_TOKEN`` cannot leak in), then the test settings are added.
        With ``base=None`` only the test settings are returned (to ``update()`` another dict with).
        ``endpoint`` overrides ``AWS_ENDPOINT_URL`` (e.g. an :class:`S3FaultProxy` in front of the store).
        """
        out = {k: v for k, v in (base or {}).items() if not k.startswith(("AWS_", "BOTO_"))}
        no_proxy = ",".join(
            x for x in (out.get("NO_PROXY") or out.get("no_proxy"), "127.0.0.1", "localhost") if x
        )
        out.update(
            {
                "AWS_ENDPOINT_URL": endpoint or self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.REGION,
                "AWS_REGION": self.REGION,
                "AWS_CONFIG_FILE": str(self.config_dir / "aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.config_dir / "aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
            }
        )
        return out

    def client(self, endpoint: str | None = None, *, verify: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this store (or for a proxy in front of it), path-style addressing."""
        cfg = Config(s3={"addressing_style": "path"}, **config)
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            verify=verify,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.REGION,
            config=cfg,
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def remove_bucket(self, bucket: str) -> None:
        """Abort open multipart uploads, delete every object, delete the bucket (stores are shared)."""
        c = self.client()
        for up in c.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            c.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                c.delete_object(Bucket=bucket, Key=obj["Key"])
        c.delete_bucket(Bucket=bucket)


def _empty_aws_config_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    (d / "aws-config").write_bytes(b"")
    (d / "aws-credentials").write_bytes(b"")
    return d


# --------------------------------------------------------------------------------------------------------
# moto
# --------------------------------------------------------------------------------------------------------


# Werkzeug (under moto.server) sends its own "Server: Werkzeug/..." header and moto adds "server: amazon.com",
# so every response carries Server twice. aiohttp's response parser is lax about that normally, but strict
# under ``python -X dev`` or PYTHONASYNCIODEBUG=1 ("400, message='Duplicate 'Server' header found.'"),
# which would break aiobotocore (and our proxy) against moto. This bootstrap drops Werkzeug's header and
# then runs exactly what ``python -m moto.server`` runs.
_MOTO_BOOTSTRAP = """
import sys
from moto.moto_server.werkzeug_app import MotoRequestHandler

def send_response(self, code, message=None):
    self.log_request(code)
    self.send_response_only(code, message)
    self.send_header("Date", self.date_time_string())

MotoRequestHandler.send_response = send_response
from moto.server import main
main(sys.argv[1:])
"""


class MotoServer(S3Store):
    """moto's server (S3, SQS, ... every service moto has) as a separate process on a loopback port.

    ``python -m moto.server -H 127.0.0.1 -p PORT`` is the moto 5.x invocation (the ``moto_server`` console
    script runs the same ``moto.server:main``). Credentials are never checked by moto; ``testing`` is used.
    With ``single_server_header=True`` (default) the same ``main()`` is started through a tiny bootstrap
    that stops Werkzeug's duplicate ``Server`` header (see ``_MOTO_BOOTSTRAP``); pass False for the stock
    ``-m moto.server`` command line.
    """

    name = "moto"
    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        start_timeout: float = 30.0,
        attempts: int = 3,
        single_server_header: bool = True,
    ) -> None:
        self.host = host
        self.single_server_header = single_server_header
        self.port = 0
        self._start_timeout = start_timeout
        self._attempts = attempts
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._log_file: Any = None

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self._proc is None:
            raise RuntimeError("MotoServer is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def config_dir(self) -> Path:
        """Directory holding the empty AWS config/credentials files (and moto's log, ``moto.log``)."""
        if self._tmpdir is None:
            raise RuntimeError("MotoServer is not running")
        return self._tmpdir

    def start(self) -> Self:
        if self._proc is not None:
            return self
        self._tmpdir = _empty_aws_config_dir("imgpipe-moto-")
        last_error = ""
        for _ in range(self._attempts):
            port = free_port(self.host)
            if self._try_start(port):
                return self
            last_error = self.output()
        self.stop()
        raise RuntimeError(f"moto server did not start; last output:\n{last_error}")

    def _try_start(self, port: int) -> bool:
        assert self._tmpdir is not None
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self._tmpdir / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        # moto builds some URLs (e.g. SQS queue URLs) from MOTO_PORT; keep it consistent with -p.
        child_env["MOTO_PORT"] = str(port)
        entry = ["-c", _MOTO_BOOTSTRAP] if self.single_server_header else ["-m", "moto.server"]
        proc = subprocess.Popen(
            [sys.executable, *entry, "-H", self.host, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
        self._proc, self.port = proc, port
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # e.g. lost the race for the port
                proc.wait()
                self._proc = None
                return False
            try:
                status, _ = _http_request(self.host, port, "GET", "/moto-api/data.json", timeout=2.0)
            except OSError:
                time.sleep(0.05)
                continue
            if status == 200:
                return True
            time.sleep(0.05)
        self._terminate(proc)
        self._proc = None
        return False

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def stop(self) -> None:
        if self._proc is not None:
            self._terminate(self._proc)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------------------
    def output(self) -> str:
        """moto's combined stdout/stderr so far (for debugging failed tests)."""
        if self._tmpdir is None:
            return ""
        try:
            return (self._tmpdir / "moto.log").read_text(errors="replace")
        except OSError:
            return ""

    def reset(self) -> None:
        """Forget every bucket, object, queue... (``POST /moto-api/reset``)."""
        status, body = _http_request(self.host, self.port, "POST", "/moto-api/reset", body=b"")
        if status != 200:
            raise RuntimeError(f"moto reset failed: {status} {body[:200]!r}")


# --------------------------------------------------------------------------------------------------------
# Ceph RADOS Gateway
# --------------------------------------------------------------------------------------------------------

# ceph-rgw-up.sh / ceph-rgw-down.sh: the shared copy first, else the verbatim copy committed with the repo.
CEPH_SCRIPT_DIRS = (REPO.parent / "shared" / "tools", REPO / ".ci" / "ceph")
CEPH_DATA_ROOT = Path("/var/tmp")  # Ceph's data (a sparse 16 GiB OSD file) never goes inside the repository


def ceph_script(name: str) -> Path:
    for d in CEPH_SCRIPT_DIRS:
        if (d / name).is_file():
            return d / name
    raise RuntimeError(f"{name} not found in {' or '.join(str(d) for d in CEPH_SCRIPT_DIRS)}")


class CephRGW(S3Store):
    """Ceph RADOS Gateway: a real object store, as the operators this product serves run it.

    With ``endpoint`` (and keys), an already-running gateway is used and left running. Without, ``start()``
    runs ``ceph-rgw-up.sh`` (one monitor, one OSD, radosgw on 127.0.0.1, free ports, data in a fresh
    folder under /var/tmp; it installs Debian's Ceph packages when missing, which needs root) and
    ``stop()`` runs ``ceph-rgw-down.sh``, which stops the daemons by the PIDs it recorded and removes it.
    Failing to start raises RuntimeError with the script's last words: a test run never skips it quietly.
    """

    name = "ceph"

    def __init__(
        self,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        start_timeout: float = 100.0,
        attempts: int = 2,
    ) -> None:
        self._given = endpoint.rstrip("/") if endpoint else None
        self.access_key = access_key or ""
        self.secret_key = secret_key or ""
        self._endpoint: str | None = None
        self._start_timeout = start_timeout
        self._attempts = attempts
        self._tmpdir: Path | None = None
        self.data_dir: Path | None = None  # set when this object started the cluster
        self.start_seconds = 0.0

    @property
    def endpoint(self) -> str:
        if self._endpoint is None:
            raise RuntimeError("CephRGW is not running")
        return self._endpoint

    @property
    def config_dir(self) -> Path:
        if self._tmpdir is None:
            raise RuntimeError("CephRGW is not running")
        return self._tmpdir

    def start(self) -> Self:
        if self._endpoint is not None:
            return self
        t0 = time.monotonic()
        self._tmpdir = _empty_aws_config_dir("imgpipe-ceph-cfg-")
        try:
            if self._given is not None:
                if not (self.access_key and self.secret_key):
                    raise RuntimeError("a given Ceph endpoint needs its access key and secret key too")
                self._endpoint = self._given
            else:
                self._start_cluster()
            # One signed request proves endpoint and credentials before any test relies on them.
            self.client(retries={"mode": "standard", "total_max_attempts": 3}).list_buckets()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_cluster(self) -> None:
        up = ceph_script("ceph-rgw-up.sh")
        last = ""
        for _ in range(self._attempts):  # a free port may be taken between free_port() and the bind
            CEPH_DATA_ROOT.mkdir(parents=True, exist_ok=True)
            data_dir = Path(tempfile.mkdtemp(prefix="imgpipe-ceph-", dir=CEPH_DATA_ROOT))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CEPH_"))}
            env.update(CEPH_DIR=str(data_dir), RGW_PORT=str(free_port()), MON_PORT=str(free_port()))
            env.setdefault("DEBIAN_FRONTEND", "noninteractive")
            self.data_dir = data_dir
            try:
                res = subprocess.run(
                    ["bash", str(up)],
                    env=env,
                    cwd=data_dir,
                    capture_output=True,
                    text=True,
                    timeout=self._start_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                self._down(keep=True)
                raise RuntimeError(
                    f"{up} did not finish within {self._start_timeout:.0f} s (logs: {data_dir}/log)"
                ) from None
            if res.returncode == 0:
                exports = dict(re.findall(r"^export (AWS_[A-Z_]+)=(.*)$", res.stdout, re.MULTILINE))
                self._endpoint = exports["AWS_ENDPOINT_URL"]
                self.access_key = exports["AWS_ACCESS_KEY_ID"]
                self.secret_key = exports["AWS_SECRET_ACCESS_KEY"]
                return
            last = (res.stderr or res.stdout).strip()[-1500:] + f"\n(logs kept in {data_dir}/log)"
            self._down(keep=True)  # stops what it started, keeps the logs; a next attempt uses a new folder
            if "already in use" not in last:
                break
        raise RuntimeError(f"Ceph RGW did not start ({up}):\n{last}")

    def _down(self, keep: bool = False) -> None:
        if self.data_dir is None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
        env["CEPH_DIR"] = str(self.data_dir)
        if keep:
            env["KEEP"] = "1"
        with contextlib.suppress(RuntimeError):
            subprocess.run(
                ["bash", str(ceph_script("ceph-rgw-down.sh"))],
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )
        self.data_dir = None  # kept folders stay for their logs; nothing of ours runs from them any more

    def stop(self) -> None:
        self._down()
        self._endpoint = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------
# aiohttp in a background thread
# --------------------------------------------------------------------------------------------------------


class _BackgroundAioServer:
    """An aiohttp application served from its own event loop in a daemon thread.

    The listening socket is bound here (port 0) and handed to aiohttp, so there is no port race.
    """

    _thread_name = "aio-server"

    def __init__(self, *, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None  # set by a subclass before start() to serve HTTPS

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """Absolute URL of ``path`` on this server (a leading slash is added if missing)."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def start(self) -> Self:
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._thread_main, args=(sock,), name=f"{self._thread_name}:{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError(f"{type(self).__name__} did not start")
        if self._error is not None:
            self._thread.join(timeout=5)
            self._thread = None
            raise RuntimeError(f"{type(self).__name__} failed to start") from self._error
        return self

    def _thread_main(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # surfaced to start() if it happens before ready
            self._error = exc
        finally:
            sock.close()
            self._ready.set()

    async def _serve(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        # shutdown_timeout: how long cleanup() waits for in-flight handlers (e.g. /slow/) before cancelling.
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.SockSite(runner, sock, ssl_context=self._ssl)
            await site.start()
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} thread did not stop")
        self._thread = self._loop = self._stop_event = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _path_key(path_or_url: str) -> str:
    """Normalise "drop/5/x", "/drop/5/x" or "http://host:port/drop/5/x" to "/drop/5/x"."""
    if "://" in path_or_url:
        path_or_url = urlsplit(path_or_url).path
    return path_or_url if path_or_url.startswith("/") else "/" + path_or_url


# --------------------------------------------------------------------------------------------------------
# HTTP file server with Range support and fault modes
# --------------------------------------------------------------------------------------------------------

_XOR_FF = bytes(b ^ 0xFF for b in range(256))
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_MODES = frozenset({"norange", "redirect", "drop", "short", "change", "change-noifmatch", "slow"})


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by :class:`RangeHTTPServer` (``range``/``if_match`` are the raw headers)."""

    method: str
    path: str
    range: str | None
    if_match: str | None
    status: int


def _parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """Return (start, end_inclusive) for a satisfiable single range, None to ignore the header (malformed
    or multi-range: RFC 9110 lets a server ignore Range), or False when unsatisfiable (416)."""
    if "," in header:
        return None
    m = _RANGE_RE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid -> ignored
    if start >= size:
        return False
    return start, min(end, size - 1)


def _etag_matches(header: str, etag: str | None) -> bool:
    """Strong comparison as required for If-Match (weak tags never match)."""
    if etag is None:
        return False
    if header.strip() == "*":
        return True
    return any(tag.strip() == etag for tag in header.split(",") if not tag.strip().startswith("W/"))


class RangeHTTPServer(_BackgroundAioServer):
    """Serves the files under ``root`` at ``/<name>`` with Range, strong ETags and If-Match.

    Fault modes are chosen by a path prefix; the rest of the path names the file:

    ``/norange/<name>``          200 full body always; no Accept-Ranges, no ETag; Range/If-Match ignored.
    ``/redirect/<name>``         302 to the absolute URL of ``/<name>`` (prefixes compose: /redirect/drop/..).
    ``/drop/<n>/<name>``         like plain, but the first ``set_drops()`` (default 2) GETs that would send
                                 a body send headers + exactly n body bytes and then kill the connection.
    ``/short/<name>``            announces the full Content-Length, sends half the body, closes cleanly.
    ``/change/<name>``           1st request: file as is, ETag "v1"; later: every byte XOR 0xFF, ETag "v2"
                                 (so If-Match "v1" -> 412).  ``set_change_after()`` changes the 1.
    ``/change-noifmatch/<name>`` like /change/ but ignores If-Match (and If-Range).
    ``/slow/<name>``             like plain, throttled to ``slow_bytes_per_sec``.
    """

    _thread_name = "range-http"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = LOOPBACK,
        chunk_size: int = 256 * 1024,
        slow_bytes_per_sec: int = 1024 * 1024,
        default_drops: int = 2,
    ) -> None:
        super().__init__(host=host)
        self.root = Path(root).resolve()
        self.chunk_size = chunk_size
        self.slow_bytes_per_sec = slow_bytes_per_sec
        self.default_drops = default_drops
        self._drops: dict[str, int] = {}
        self._change_after: dict[str, int] = {}
        self._change_seen: dict[str, int] = {}
        self._requests: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._log: list[RequestRecord] = []
        self._redirects = 0

    # -- configuration (test thread) ------------------------------------------------------------------
    def set_drops(self, path: str, count: int) -> None:
        """How many more GETs of ``path`` (e.g. "/drop/100/disk.img") get cut short (default 2)."""
        with self._lock:
            self._drops[_path_key(path)] = count

    def drops_remaining(self, path: str) -> int:
        with self._lock:
            return self._drops.get(_path_key(path), self.default_drops)

    def set_change_after(self, path: str, requests: int) -> None:
        """For a /change/ path: how many requests (any method) still see version 1 (default 1)."""
        key = _path_key(path)
        with self._lock:
            self._change_after[key] = requests
            self._change_seen[key] = 0

    def reset_faults(self) -> None:
        """Re-arm drops (back to ``default_drops``) and /change/ paths (back to version 1)."""
        with self._lock:
            self._drops.clear()
            self._change_after.clear()
            self._change_seen.clear()

    # -- statistics (test thread) ---------------------------------------------------------------------
    def request_count(self, path: str | None = None) -> int:
        """Requests seen for ``path`` (or in total)."""
        with self._lock:
            if path is None:
                return sum(self._requests.values())
            return self._requests.get(_path_key(path), 0)

    @property
    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._requests)

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes handed to the socket for ``path`` (or in total)."""
        with self._lock:
            if path is None:
                return sum(self._bytes.values())
            return self._bytes.get(_path_key(path), 0)

    @property
    def bytes_sent_by_path(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    @property
    def log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    @property
    def redirects_served(self) -> int:
        with self._lock:
            return self._redirects

    def reset_stats(self) -> None:
        with self._lock:
            self._requests.clear()
            self._bytes.clear()
            self._log.clear()
            self._redirects = 0

    # -- server side ----------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        app.router.add_route("HEAD", "/{tail:.*}", self._handle)
        return app

    def _resolve(self, name: str) -> Path | None:
        if not name:
            return None
        candidate = (self.root / name).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    def _record(self, request: web.Request, status: int) -> None:
        rec = RequestRecord(
            request.method,
            request.path,
            request.headers.get("Range"),
            request.headers.get("If-Match"),
            status,
        )
        with self._lock:
            self._log.append(rec)

    def _add_bytes(self, path: str, n: int) -> None:
        with self._lock:
            self._bytes[path] = self._bytes.get(path, 0) + n

    def _simple(
        self, request: web.Request, status: int, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self._record(request, status)
        return web.Response(status=status, headers=headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        with self._lock:
            self._requests[path] = self._requests.get(path, 0) + 1

        mode, drop_n, name = "plain", 0, path.lstrip("/")
        head, _, rest = name.partition("/")
        if head in _MODES and rest:
            mode, name = head, rest
            if mode == "drop":
                n_str, _, name = rest.partition("/")
                if not n_str.isdigit() or not name:
                    return self._simple(request, 404)
                drop_n = int(n_str)

        if mode == "redirect":
            with self._lock:
                self._redirects += 1
            return self._simple(request, 302, {"Location": self.url("/" + name)})

        file = self._resolve(name)
        if file is None:
            return self._simple(request, 404)

        fd = os.open(file, os.O_RDONLY)
        try:
            return await self._serve_file(request, path, mode, drop_n, fd)
        finally:
            os.close(fd)

    async def _serve_file(
        self, request: web.Request, path: str, mode: str, drop_n: int, fd: int
    ) -> web.StreamResponse:
        st = os.fstat(fd)
        size = st.st_size
        mtime = st.st_mtime
        xor = False
        etag: str | None = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        if mode in ("change", "change-noifmatch"):
            with self._lock:
                seen = self._change_seen.get(path, 0)
                self._change_seen[path] = seen + 1
                v1 = seen < self._change_after.get(path, 1)
            etag = '"v1"' if v1 else '"v2"'
            xor = not v1
            mtime = mtime if v1 else mtime + 1
        elif mode == "norange":
            etag = None
        last_modified = email.utils.formatdate(mtime, usegmt=True)
        preconditions = mode not in ("norange", "change-noifmatch")
        ranges = mode != "norange"

        if_match = request.headers.get("If-Match")
        if preconditions and if_match is not None and not _etag_matches(if_match, etag):
            return self._simple(request, 412, {"ETag": etag} if etag else None)

        headers: dict[str, str] = {"Last-Modified": last_modified, "Content-Type": "application/octet-stream"}
        if etag is not None:
            headers["ETag"] = etag
        if ranges:
            headers["Accept-Ranges"] = "bytes"

        status, start, length = 200, 0, size
        range_header = request.headers.get("Range")
        if ranges and range_header is not None:
            if_range = request.headers.get("If-Range")
            if preconditions and if_range is not None:
                if_range = if_range.strip()
                ok = if_range == etag if if_range.startswith('"') else if_range == last_modified
                if not ok:
                    range_header = None
        if ranges and range_header is not None:
            parsed = _parse_range(range_header, size)
            if parsed is False:
                headers["Content-Range"] = f"bytes */{size}"
                return self._simple(request, 416, headers)
            if isinstance(parsed, tuple):
                first, last = parsed
                status, start, length = 206, first, last - first + 1
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"

        limit = length
        abort = False
        if request.method == "GET":
            if mode == "drop":
                with self._lock:
                    remaining = self._drops.get(path, self.default_drops)
                    if remaining > 0:
                        self._drops[path] = remaining - 1
                        limit, abort = min(drop_n, length), True
            elif mode == "short":
                limit = length // 2

        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        if mode == "short":
            resp.force_close()
        self._record(request, status)
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            rate = self.slow_bytes_per_sec if mode == "slow" else None
            await self._stream(resp, path, fd, start, limit, xor=xor, rate=rate)
            if abort:
                await self._abort(request)
                return resp
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; aiohttp copes with the half-written response
        return resp

    async def _stream(
        self,
        resp: web.StreamResponse,
        path: str,
        fd: int,
        offset: int,
        count: int,
        *,
        xor: bool,
        rate: int | None,
    ) -> None:
        chunk = self.chunk_size if rate is None else max(1, min(self.chunk_size, rate // 20))
        pos, remaining = offset, count
        while remaining > 0:
            # Plain blocking pread: page-cache reads of <= 256 KiB are far cheaper than an executor hop.
            data = os.pread(fd, min(chunk, remaining), pos)
            if not data:
                break  # file shrank under us
            if xor:
                data = data.translate(_XOR_FF)
            await resp.write(data)
            self._add_bytes(path, len(data))
            pos += len(data)
            remaining -= len(data)
            if rate:
                await asyncio.sleep(len(data) / rate)

    @staticmethod
    async def _abort(request: web.Request) -> None:
        """Kill the connection after the bytes written so far have reached the kernel.

        ``transport.abort()`` discards asyncio's user-space write buffer, so wait for it to drain first;
        the kernel then still delivers what it holds, followed by FIN: the client reads exactly the bytes
        written and then sees the connection end before Content-Length was reached.
        """
        transport = request.transport
        if transport is None:
            return
        for _ in range(10_000):  # <= ~10 s
            if not transport.get_write_buffer_size() or transport.is_closing():
                break
            await asyncio.sleep(0.001)
        transport.abort()


# --------------------------------------------------------------------------------------------------------
# S3 fault-injecting reverse proxy
# --------------------------------------------------------------------------------------------------------

_S3_ERROR_CODES: dict[int, tuple[str, str]] = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchUpload", "The specified upload does not exist."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def s3_error_xml(code: str, message: str) -> bytes:
    rid = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{rid}</RequestId><HostId>imgpipe-fault-proxy</HostId></Error>"
    ).encode()


def _s3_operation(method: str, path: str, query: Mapping[str, str]) -> str:
    """Best-effort S3 operation name for path-style requests (enough for the log)."""
    key = path.lstrip("/").partition("/")[2]
    if method == "PUT" and "partNumber" in query and "uploadId" in query:
        return "UploadPart"
    if method == "POST" and "uploadId" in query:
        return "CompleteMultipartUpload"
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    if method == "DELETE" and "uploadId" in query:
        return "AbortMultipartUpload"
    if method == "GET" and "uploadId" in query:
        return "ListParts"
    if method == "GET" and "uploads" in query:
        return "ListMultipartUploads"
    if key:
        return {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}.get(
            method, method
        )
    return {"GET": "ListObjects", "HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(
        method, method
    )


@dataclass
class ProxyRecord:
    """One request seen by :class:`S3FaultProxy`, in arrival order.

    ``status`` is 0 until the response is known; ``injected`` is True if the proxy answered by itself;
    ``body`` is kept for CompleteMultipartUpload requests only.
    """

    method: str
    path: str
    query: dict[str, str]
    status: int = 0
    operation: str = ""
    injected: bool = False
    body: bytes | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # request headers, names lower-cased
    answered: float = 0.0  # time.monotonic() when the status was known (0 until then)

    @property
    def part_number(self) -> int | None:
        pn = self.query.get("partNumber")
        return int(pn) if pn is not None and pn.isdigit() else None

    def completed_part_numbers(self) -> list[int]:
        """Part numbers listed in a CompleteMultipartUpload body, in document order."""
        if not self.body:
            return []
        root = ET.fromstring(self.body)
        return [int(el.text or "0") for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "PartNumber"]


@dataclass
class _Fault:
    operation: str
    remaining: int
    status: int
    code: str
    message: str
    part_number: int | None = None


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost that is its own CA (hand it to clients as the CA bundle)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgpipe test proxy")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class S3FaultProxy(_BackgroundAioServer):
    """Reverse proxy to an S3 endpoint (a :class:`MotoServer` or :class:`CephRGW`) that can inject failures.

    Requests are relayed unchanged (method, raw path + query, headers including Host/Authorization/
    x-amz-*, body streamed) and so are responses (status, headers minus hop-by-hop ones, body bytes, no
    decompression); SigV4 signatures stay valid because Host is relayed as the client sent it. Point the
    client's endpoint at :attr:`endpoint`. With ``tls=True`` the proxy serves HTTPS with a self-signed
    certificate (:attr:`ca_bundle`; :meth:`env` sets ``AWS_CA_BUNDLE``), so clients behave as they do
    against a real https endpoint (botocore, for one, streams checksummed uploads differently over TLS).
    """

    _thread_name = "s3-fault-proxy"

    def __init__(self, upstream: S3Store | str, *, host: str = LOOPBACK, tls: bool = False) -> None:
        super().__init__(host=host)
        self._store = upstream if isinstance(upstream, S3Store) else None
        self._upstream_arg = upstream
        self._session: aiohttp.ClientSession | None = None
        self._faults: list[_Fault] = []
        self._delays: dict[int, float] = {}
        self._log: list[ProxyRecord] = []
        self._hooks: dict[str, Callable[[], None]] = {}
        self._hook_skips: dict[str, int] = {}
        self._lose_complete = 0
        self._cert_dir: Path | None = None
        self.ca_bundle: str | None = None
        if tls:
            self._cert_dir = Path(tempfile.mkdtemp(prefix="imgpipe-proxy-tls-"))
            cert, key = _self_signed_cert(self._cert_dir)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            self._ssl = ctx
            self.ca_bundle = str(cert)

    @property
    def upstream(self) -> str:
        up = self._upstream_arg
        return (up.endpoint if isinstance(up, S3Store) else up).rstrip("/")

    @property
    def endpoint(self) -> str:
        return self.base_url

    @property
    def store(self) -> S3Store:
        if self._store is None:
            raise RuntimeError("the proxy was constructed with a URL, not an S3Store")
        return self._store

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Like :meth:`S3Store.env` but with ``AWS_ENDPOINT_URL`` pointing at this proxy."""
        env = self.store.env(base, endpoint=self.endpoint)
        if self.ca_bundle:
            env["AWS_CA_BUNDLE"] = self.ca_bundle
        return env

    def client(self, **config: Any) -> Any:
        """A boto3 client that goes through this proxy."""
        return self.store.client(endpoint=self.endpoint, verify=self.ca_bundle, **config)

    def stop(self) -> None:
        super().stop()
        if self._cert_dir is not None:
            shutil.rmtree(self._cert_dir, ignore_errors=True)
            self._cert_dir = None

    def delay_upload_part(self, part_number: int, seconds: float) -> None:
        """Hold every UploadPart request for ``part_number`` for ``seconds`` before forwarding it, so later
        parts finish first (the upload order then differs from the part order)."""
        with self._lock:
            self._delays[part_number] = seconds

    # -- fault rules (test thread) --------------------------------------------------------------------
    def fail_upload_part(
        self, times: int = 1, status: int = 500, part_number: int | None = None, *, code: str | None = None
    ) -> None:
        """Answer the next ``times`` UploadPart requests (optionally only those for ``part_number``) with
        ``status`` and an S3 XML error body, without forwarding them (the request body is read first)."""
        dflt_code, message = _S3_ERROR_CODES.get(status, ("InternalError", "Injected failure"))
        with self._lock:
            self._faults.append(_Fault("UploadPart", times, status, code or dflt_code, message, part_number))

    def fail_complete_in_body(self, times: int = 1, *, code: str = "InternalError") -> None:
        """Answer the next ``times`` CompleteMultipartUpload requests with ``200 OK`` and an ``<Error>``
        body, without forwarding them (AWS documents that CompleteMultipartUpload can do this)."""
        message = _S3_ERROR_CODES[500][1]
        with self._lock:
            self._faults.append(_Fault("CompleteMultipartUpload", times, 200, code, message))

    def fail_complete(self, times: int = 1, status: int = 404, *, code: str | None = None) -> None:
        """Answer the next ``times`` CompleteMultipartUpload requests with ``status`` (default 404
        NoSuchUpload, what a store says to a retried Complete once it has forgotten the upload)."""
        dflt_code, message = _S3_ERROR_CODES.get(status, ("InternalError", "Injected failure"))
        with self._lock:
            self._faults.append(_Fault("CompleteMultipartUpload", times, status, code or dflt_code, message))

    def before_first(self, operation: str, hook: Callable[[], None], *, skip: int = 0) -> None:
        """Call ``hook`` (in a worker thread) once, before forwarding an ``operation`` request: the next
        one, or the one after ``skip`` more of them have gone through (e.g. overwrite an object mid-read)."""
        with self._lock:
            self._hooks[operation] = hook
            self._hook_skips[operation] = skip

    def lose_complete_answer(self, times: int = 1) -> None:
        """Forward the next ``times`` CompleteMultipartUpload requests, then answer 500 instead of the
        store's answer: the upload completed, the client does not know (a connection lost at the end)."""
        with self._lock:
            self._lose_complete += times

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        """Injections armed but not yet triggered."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    # -- log (test thread) ----------------------------------------------------------------------------
    @property
    def log(self) -> list[ProxyRecord]:
        with self._lock:
            return [dataclasses.replace(r, query=dict(r.query), headers=dict(r.headers)) for r in self._log]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def records(self, operation: str) -> list[ProxyRecord]:
        """Logged requests of one operation, e.g. "UploadPart", "CompleteMultipartUpload"."""
        return [r for r in self.log if r.operation == operation]

    def upload_part_numbers(self, *, include_injected: bool = True) -> list[int]:
        """Part numbers of UploadPart requests in arrival order."""
        return [
            r.part_number
            for r in self.records("UploadPart")
            if r.part_number is not None and (include_injected or not r.injected)
        ]

    def completed_part_numbers(self, index: int = -1) -> list[int]:
        """Part numbers, in body order, of the ``index``-th logged CompleteMultipartUpload request."""
        return self.records("CompleteMultipartUpload")[index].completed_part_numbers()

    # -- server side ----------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_startup.append(self._open_session)
        app.on_cleanup.append(self._close_session)
        return app

    async def _open_session(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def _close_session(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _take_fault(self, operation: str, part_number: int | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.operation != operation or fault.remaining <= 0:
                    continue
                if fault.part_number is not None and fault.part_number != part_number:
                    continue
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                return fault
        return None

    def _set_status(self, rec: ProxyRecord, status: int, *, injected: bool = False) -> None:
        with self._lock:
            rec.status = status
            rec.injected = injected
            rec.answered = time.monotonic()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items()}
        rec = ProxyRecord(
            request.method,
            request.path,
            query,
            operation=_s3_operation(request.method, request.path, query),
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        with self._lock:
            self._log.append(rec)
            hook = None
            if rec.operation in self._hooks:
                if self._hook_skips.get(rec.operation, 0) > 0:
                    self._hook_skips[rec.operation] -= 1
                else:
                    hook = self._hooks.pop(rec.operation)
            delay = self._delays.get(rec.part_number or 0, 0.0) if rec.operation == "UploadPart" else 0.0
        if delay:
            await asyncio.sleep(delay)
        if hook is not None:
            # Runs before forwarding, once: e.g. replace the object the request is about to read.
            await asyncio.to_thread(hook)

        body: bytes | None = None
        fault: _Fault | None = None
        if rec.operation == "UploadPart":
            fault = self._take_fault("UploadPart", rec.part_number)
        elif rec.operation == "CompleteMultipartUpload":
            body = await request.read()
            with self._lock:
                rec.body = body
                lose = self._lose_complete > 0  # checked before the fault rules: it comes first
                self._lose_complete -= lose
            if lose:
                return await self._forward_then_fail(request, rec, body)
            fault = self._take_fault("CompleteMultipartUpload", None)
        if fault is not None:
            await request.read()  # consume the upload like S3 would before answering
            self._set_status(rec, fault.status, injected=True)
            return web.Response(
                status=fault.status,
                body=s3_error_xml(fault.code, fault.message),
                headers={"Content-Type": "application/xml", "x-amz-request-id": uuid.uuid4().hex[:16]},
            )
        return await self._forward(request, rec, body)

    async def _forward_then_fail(
        self, request: web.Request, rec: ProxyRecord, body: bytes | None
    ) -> web.StreamResponse:
        """Relay the request, read the store's whole answer, and send the client a 500 instead."""
        assert self._session is not None
        skip = _HOP_BY_HOP | {"expect", "content-length"}
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in skip)
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            data=body if body is not None else await request.read(),
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as upstream:
            await upstream.read()
        self._set_status(rec, 500, injected=True)
        return web.Response(
            status=500,
            body=s3_error_xml(*_S3_ERROR_CODES[500]),
            headers={"Content-Type": "application/xml", "x-amz-request-id": uuid.uuid4().hex[:16]},
        )

    async def _forward(
        self, request: web.Request, rec: ProxyRecord, body: bytes | None
    ) -> web.StreamResponse:
        assert self._session is not None
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in request.headers.items():
            lk = k.lower()
            if lk in _HOP_BY_HOP or lk == "expect":  # our own server already answered 100-continue
                continue
            if body is not None and lk == "content-length":
                continue  # aiohttp sets it from the bytes
            headers.add(k, v)
        data: Any = None
        if body is not None:
            data = body
        elif request.body_exists:
            data = request.content  # streamed; keeps the client's Content-Length, or goes chunked
        url = URL(self.upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            ) as upstream:
                self._set_status(rec, upstream.status)
                resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() in _HOP_BY_HOP or k.lower() == "content-length":
                        continue
                    resp.headers.add(k, v)
                cl = upstream.headers.get("Content-Length")
                if cl is not None and cl.isdigit():
                    resp.content_length = int(cl)
                try:
                    await resp.prepare(request)
                    if request.method != "HEAD":
                        async for chunk in upstream.content.iter_any():
                            await resp.write(chunk)
                    await resp.write_eof()
                except ConnectionError:
                    pass  # client went away
                except aiohttp.ClientError:
                    # Upstream died mid-body: pass the truncation on rather than inventing an ending.
                    if request.transport is not None:
                        request.transport.abort()
                return resp
        except aiohttp.ClientError as exc:  # before any response byte was relayed
            self._set_status(rec, 502)
            return web.Response(status=502, text=f"upstream error: {exc!r}")
