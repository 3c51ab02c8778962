"""Run one child process and measure it the way the benchmark reports it.

- wall seconds: from just before the spawn to the moment the child has exited (os.waitid), not to the end
  of our own pipe reading;
- CPU seconds: from the rusage that os.wait4 returns for that child (user + sys); the kernel folds the
  child's own reaped descendants into it, so `sh -c 'a && b'` counts a and b;
- peak RSS: the largest VmHWM of any process of the child's session, sampled every 50 ms. Not ru_maxrss:
  Linux carries the spawning process's high-water RSS across fork+exec into the child's ru_maxrss, so
  once this harness had grown (boto3 moving a 1.2 GB object in-process) every child reported its 244 MiB;
- machine CPU seconds: every core's busy time (/proc/stat) from spawn to exit, the child's and everyone
  else's: on a machine whose cores the loopback servers share, what a run cost the whole box;
- bytes written to storage: `write_bytes` (and `cancelled_write_bytes`) of /proc/<pid>/io, read while the
  child is a zombie: os.waitid(WEXITED | WNOWAIT) waits for the exit without reaping, the file is read,
  then os.wait4 reaps. The kernel accounts write_bytes when a page is dirtied (not at writeback), and folds
  reaped descendants and exited threads into it, so nothing escapes. If that does not work on a kernel
  (checked once by zombie_io_selftest), the fallback samples the file every 50 ms while the child runs and
  can miss the last 50 ms.
The child gets its own session (process group), so a timeout kills exactly what we started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IO_ZOMBIE = "zombie"  # /proc/<pid>/io read after exit, before reaping
IO_SAMPLED = "sampled-50ms"  # fallback: last sample taken while running
SAMPLE_PERIOD = 0.05


def machine_busy() -> float:
    """Seconds of CPU time all cores have spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measure:
    argv: list[str]
    rc: int
    wall: float
    user: float
    sys: float
    maxrss: int  # bytes
    write_bytes: int | None
    cancelled_write_bytes: int | None
    read_bytes: int | None
    io_method: str
    stdout: str
    stderr: str
    timed_out: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def brief(self) -> str:
        wb = "?" if self.write_bytes is None else fmt_bytes(self.write_bytes)
        return (
            f"{self.wall:.2f} s wall, {self.cpu:.2f} s CPU, {self.maxrss / 2**20:.0f} MiB RSS, "
            f"{wb} written, rc={self.rc}"
        )

    def stderr_tail(self, n: int = 800) -> str:
        return self.stderr[-n:].strip()


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def read_proc_io(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key.strip()] = int(value)
    return out if "write_bytes" in out else None


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        sink.append(chunk)
    stream.close()


def session_hwm(sid: int) -> int:
    """Largest VmHWM (peak resident set) in bytes among the live processes of session `sid`."""
    best = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            # Field 6 is the session id; fields after the ")" that ends the command name.
            if int(stat[stat.rindex(b")") + 2 :].split()[3]) != sid:
                continue
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        best = max(best, int(line.split()[1]) * 1024)
                        break
        except (OSError, ValueError, IndexError):
            continue
    return best


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 1800.0,
    io_method: str = IO_ZOMBIE,
) -> Measure:
    """Run argv to completion and measure it (see the module docstring). Never raises on a non-zero exit."""
    out: list[bytes] = []
    err: list[bytes] = []
    samples: list[dict[str, int]] = []
    done = threading.Event()
    timed_out = threading.Event()

    busy0 = machine_busy()
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    pid = proc.pid
    assert proc.stdout is not None
    assert proc.stderr is not None
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
    ]
    for t in readers:
        t.start()

    def sampler() -> None:
        while not done.wait(SAMPLE_PERIOD):
            got = read_proc_io(pid)
            if got is not None:
                samples.append(got)

    hwm = [0]

    def rss_sampler() -> None:
        while True:
            hwm[0] = max(hwm[0], session_hwm(pid))
            if done.wait(SAMPLE_PERIOD):
                return

    def on_timeout() -> None:
        if not done.is_set():  # the leader has not exited yet, so its PID is still ours
            timed_out.set()
            _kill_group(pid)

    rss_thread = threading.Thread(target=rss_sampler, daemon=True)
    rss_thread.start()
    sampler_thread = None
    if io_method == IO_SAMPLED:
        sampler_thread = threading.Thread(target=sampler, daemon=True)
        sampler_thread.start()
    timer = threading.Timer(timeout, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - start
        machine_cpu = machine_busy() - busy0
        io = read_proc_io(pid) if io_method == IO_ZOMBIE else None
        done.set()
        rss_thread.join()
        if sampler_thread is not None:
            sampler_thread.join()
            io = samples[-1] if samples else None
        # readers finish as soon as the pipes close; a descendant that still holds them is ours: end it
        # while the leader is still an unreaped zombie (its PID, the group id, cannot be reused yet)
        for t in readers:
            t.join(5)
        if any(t.is_alive() for t in readers):
            _kill_group(pid)
        _, status, ru = os.wait4(pid, 0)
    except BaseException:
        _kill_group(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        proc.returncode = -9
        raise
    finally:
        timer.cancel()
        done.set()
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # we reaped it ourselves; keep Popen from trying again
    for t in readers:
        t.join(10)
    return Measure(
        argv=list(argv),
        rc=rc,
        wall=wall,
        user=ru.ru_utime,
        sys=ru.ru_stime,
        maxrss=hwm[0],
        write_bytes=None if io is None else io.get("write_bytes"),
        cancelled_write_bytes=None if io is None else io.get("cancelled_write_bytes"),
        read_bytes=None if io is None else io.get("read_bytes"),
        io_method=io_method,
        stdout=b"".join(out).decode("utf-8", "replace"),
        stderr=b"".join(err).decode("utf-8", "replace"),
        timed_out=timed_out.is_set(),
        extra={"machine_cpu": machine_cpu},
    )


def zombie_io_selftest(tmpdir: Path) -> tuple[str, str]:
    """Check that /proc/<pid>/io of a zombie is readable and counts what it wrote (without fsync).

    Returns (io_method to use, one line that says what was found)."""
    target = tmpdir / "zombie-io-selftest.bin"
    size = 8 * 2**20
    code = f"import sys\nwith open(sys.argv[1], 'wb') as f:\n    f.write(b'x' * {size})\n"
    try:
        m = run_measured([sys.executable, "-c", code, str(target)], timeout=60)
    finally:
        target.unlink(missing_ok=True)
    if m.rc == 0 and m.write_bytes is not None and m.write_bytes >= size:
        return IO_ZOMBIE, (
            f"/proc/<pid>/io of a zombie (waitid WNOWAIT, then wait4) works: a child that wrote "
            f"{fmt_bytes(size)} without fsync shows write_bytes={m.write_bytes}"
        )
    return IO_SAMPLED, (
        f"/proc/<pid>/io of a zombie is unusable here (rc={m.rc}, write_bytes={m.write_bytes}); "
        f"falling back to sampling it every {SAMPLE_PERIOD * 1000:.0f} ms while the child runs"
    )


def combine(parts: Sequence[Measure], argv: Sequence[str]) -> Measure:
    """Several sequential steps measured as one (wall and CPU add up, RSS is the largest)."""

    def total(vals: Sequence[int | None]) -> int | None:
        return None if any(v is None for v in vals) else sum(v or 0 for v in vals)

    first_bad = next((p for p in parts if p.rc != 0), None)
    return Measure(
        argv=list(argv),
        rc=first_bad.rc if first_bad else 0,
        wall=sum(p.wall for p in parts),
        user=sum(p.user for p in parts),
        sys=sum(p.sys for p in parts),
        maxrss=max(p.maxrss for p in parts),
        write_bytes=total([p.write_bytes for p in parts]),
        cancelled_write_bytes=total([p.cancelled_write_bytes for p in parts]),
        read_bytes=total([p.read_bytes for p in parts]),
        io_method=parts[0].io_method,
        stdout="".join(p.stdout for p in parts),
        stderr="".join(p.stderr for p in parts),
        timed_out=any(p.timed_out for p in parts),
        extra={f"step{i + 1}_wall": p.wall for i, p in enumerate(parts)},
    )
