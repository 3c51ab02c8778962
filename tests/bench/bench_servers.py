"""Loopback servers the benchmark starts and stops itself: nginx (HTTP with ranges), moto (S3), Ceph RGW (S3).

Every server is a child process in its own session, started on 127.0.0.1 and a free port, and stopped by its
own process-group id (nginx's master and workers, moto's server) or, for Ceph, by ceph-rgw-down.sh, which
stops the PIDs that ceph-rgw-up.sh recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
Log = Callable[[str], None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} before listening on {HOST}:{port}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Stop a child started with start_new_session=True, and everything in its process group.

    The leader is left unreaped (a zombie) until the group has been killed, so its PID, which is the group
    id, cannot be reused by an unrelated process in between."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (workers), or the leader itself
    proc.wait(10)


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen {host}:{port};
        server_name localhost;
        root {root};
        location / {{ }}
    }}
}}
"""


@dataclass
class Nginx:
    root: Path
    prefix: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Log) -> None:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(exe):
            raise RuntimeError("nginx not found (apt-get install nginx-light)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "tmp").mkdir(exist_ok=True)
        self.port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, host=HOST, port=self.port, root=self.root))
        argv = [exe, "-e", str(self.prefix / "error.log"), "-c", str(conf), "-p", str(self.prefix)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.prefix / "stderr.log", "wb"),  # noqa: SIM115 - the child owns it
            start_new_session=True,
        )
        wait_port(self.port, self.proc, 15, "nginx")
        log(f"nginx: pid {self.proc.pid}, http://{HOST}:{self.port}/ serving {self.root}")

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, signal.SIGQUIT)
            self.proc = None


@dataclass
class S3Server:
    """One S3 endpoint: its name (row suffix), the env vars a client needs, and how to stop it."""

    name: str
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    stop_cmd: list[str] = field(default_factory=list)
    stop_env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None
        if self.stop_cmd:
            subprocess.run(self.stop_cmd, env=self.stop_env, capture_output=True, check=False)
            self.stop_cmd = []


def start_moto(workdir: Path, log: Log) -> S3Server:
    port = free_port()
    tmp = workdir / "moto-tmp"  # moto spills objects over 5 MiB to temp files: keep them in our workdir
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp))
    argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "moto.log", "wb"),  # noqa: SIM115 - the child owns it
        env=env,
        start_new_session=True,
    )
    wait_port(port, proc, 30, "moto server")
    log(f"moto: pid {proc.pid}, http://{HOST}:{port}")
    client_env = {
        "AWS_ENDPOINT_URL": f"http://{HOST}:{port}",
        "AWS_ACCESS_KEY_ID": "benchkey",
        "AWS_SECRET_ACCESS_KEY": "benchsecret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return S3Server("moto", client_env, tmp, proc=proc)


REPO = Path(__file__).resolve().parent.parent.parent
# The shared copy of ceph-rgw-up.sh / ceph-rgw-down.sh first, else the verbatim copy committed in .ci/ceph.
CEPH_TOOL_DIRS = (REPO.parent / "shared" / "tools", REPO / ".ci" / "ceph")


def ceph_tools() -> tuple[Path, Path]:
    for d in CEPH_TOOL_DIRS:
        if (d / "ceph-rgw-up.sh").is_file() and (d / "ceph-rgw-down.sh").is_file():
            return d / "ceph-rgw-up.sh", d / "ceph-rgw-down.sh"
    raise RuntimeError(f"ceph-rgw-up.sh not found in {' or '.join(map(str, CEPH_TOOL_DIRS))}")


def start_ceph(workdir: Path, log: Log, store_gib: int = 48) -> S3Server:
    up, down = ceph_tools()
    ceph_dir = workdir / "ceph-rgw"
    env = dict(
        os.environ,
        CEPH_DIR=str(ceph_dir),
        RGW_PORT=str(free_port()),
        MON_PORT=str(free_port()),
        STORE_GIB=str(store_gib),
    )
    stop_env = dict(env)
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(up)], env=env, capture_output=True, text=True, check=False, cwd=workdir)
    if res.returncode != 0:
        subprocess.run(["bash", str(down)], env=dict(stop_env, KEEP="1"), capture_output=True, check=False)
        raise RuntimeError(f"ceph-rgw-up.sh failed ({res.returncode}): {res.stderr.strip()[-1500:]}")
    client_env: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"^export (AWS_[A-Z_]+)=(.*)$", line.strip())
        if m:
            client_env[m.group(1)] = m.group(2).strip("'\"")
    if "AWS_ENDPOINT_URL" not in client_env:
        raise RuntimeError(f"ceph-rgw-up.sh printed no AWS_ENDPOINT_URL: {res.stdout[-500:]}")
    log(f"ceph rgw: {client_env['AWS_ENDPOINT_URL']} up in {time.monotonic() - t0:.0f} s ({ceph_dir})")
    return S3Server("ceph", client_env, ceph_dir, stop_cmd=["bash", str(down)], stop_env=stop_env)
