"""Shared test helpers: run the CLI as users do, build images, ask qemu-img (the oracle)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = ROOT.parent / "shared" / "testdata" / "real"
KiB = 1024
MiB = 1024 * KiB


def imgpipe(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | int | None = None,
    stdout: int | None = subprocess.PIPE,
    timeout: float = 90,
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m pipeline` as a separate process, exactly as a user runs the tool."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMGPIPE_"))}
    full_env["PYTHONWARNINGS"] = "error::RuntimeWarning"  # e.g. a never-awaited coroutine fails loudly
    full_env.update(env or {})
    kwargs: dict[str, Any] = {}
    if isinstance(stdin, bytes):
        kwargs["input"] = stdin
    elif stdin is not None:
        kwargs["stdin"] = stdin
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=full_env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        **kwargs,
    )


def summary_of(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return out


def error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The last stderr line: the one-line error users see."""
    lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def qemu_check(path: Path | str) -> None:
    p = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"qemu-img check failed: {p.stdout}{p.stderr}"
    assert "No errors were found" in p.stdout, p.stdout
    assert "leaked" not in p.stdout, p.stdout


def qemu_compare(a: Path | str, b: Path | str, fmt_a: str | None = None, fmt_b: str | None = None) -> None:
    cmd = ["qemu-img", "compare"]
    if fmt_a:
        cmd += ["-f", fmt_a]
    if fmt_b:
        cmd += ["-F", fmt_b]
    p = subprocess.run([*cmd, str(a), str(b)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"qemu-img compare: {p.stdout}{p.stderr}"


def qemu_info(path: Path | str) -> dict[str, Any]:
    p = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    info: dict[str, Any] = json.loads(p.stdout)
    return info


def make_raw(path: Path, size: int, seed: int = 0, data_fraction: float = 0.3, block: int = 4096) -> Path:
    """A sparse-ish disk: random data blocks at random places, zeros elsewhere; deterministic per seed.

    The file is written in full (zeros included) so the tool sees a fully allocated file.
    """
    rng = random.Random(seed)
    buf = bytearray(size)
    if size and data_fraction > 0:
        n = max(1, int(size * data_fraction / block))
        for _ in range(n):
            off = rng.randrange(0, size)
            ln = min(rng.randrange(1, block + 1), size - off)
            buf[off : off + ln] = rng.randbytes(ln)
    path.write_bytes(buf)
    return path


def pattern_disk(
    path: Path, size: int, seed: int, runs: tuple[int, ...] = (4 * KiB, 60 * KiB, 300 * KiB, MiB)
) -> Path:
    """A disk with compressible data (text-like records) and random data, in runs, with holes."""
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        run = rng.choice(runs)
        kind = rng.random()
        n = min(run, size - pos)
        if kind < 0.35:
            pass  # hole
        elif kind < 0.75:
            rec = f"record {pos:#x} seed {seed} ".encode() * 8
            buf[pos : pos + n] = (rec * (n // len(rec) + 1))[:n]
        else:
            buf[pos : pos + n] = rng.randbytes(n)
        pos += n
    path.write_bytes(buf)
    return path


def leftovers(directory: Path) -> list[str]:
    """Temporary files the tool may have left beside a destination."""
    return sorted(p.name for p in directory.iterdir() if "imgpipe-partial" in p.name)
