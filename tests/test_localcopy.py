"""The threaded path for a local raw file into a local file (pipeline/localcopy.py).

Its output must be the stage path's, byte for byte (the same Qcow2Writer lays it out), and it must fail
as the stages do: one line, nothing left beside the destination, no worker left running.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import localcopy
from pipeline.errors import SinkError, SourceError
from pipeline.runner import convert
from pipeline.settings import from_env
from pipeline.threads import to_thread_to_end
from tests.helpers import MiB, leftovers, make_raw, qemu_check, qemu_compare

# Small chunks: many of them, so the workers take turns often (and out of step).
CHUNK = {"IMGPIPE_CHUNK_SIZE": "64K"}


def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the jobs that took the threaded path; the real one still runs."""
    calls: list[int] = []
    real = localcopy.local_copy

    async def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        await real(*args, **kwargs)

    monkeypatch.setattr(localcopy, "local_copy", counted)
    return calls


async def both_paths(
    monkeypatch: pytest.MonkeyPatch, src: Path, tmp_path: Path, env: dict[str, str]
) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    calls = spy(monkeypatch)
    fast, staged = tmp_path / "fast.out", tmp_path / "staged.out"
    s_fast = await convert(str(src), str(fast), from_env(env, progress=False))
    assert calls == [1]
    monkeypatch.setattr(localcopy, "eligible", lambda *a: False)
    s_staged = await convert(str(src), str(staged), from_env(env, progress=False))
    assert calls == [1]
    return fast, staged, s_fast, s_staged


@pytest.mark.parametrize(
    ("size", "env"),
    [
        (5 * MiB + 4096 + 1000, {**CHUNK, "IMGPIPE_CLUSTER_SIZE": "4K"}),  # ragged end, small clusters
        (9 * MiB + 4096, {"IMGPIPE_CLUSTER_SIZE": "2M"}),  # one cluster per chunk, a ragged last one
        (7 * MiB + 512, {**CHUNK, "IMGPIPE_COMPAT": "0.10"}),
    ],
)
async def test_qcow2_is_the_stage_paths_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: int, env: dict[str, str]
) -> None:
    src = make_raw(tmp_path / "disk.raw", size, seed=size)
    fast, staged, s_fast, s_staged = await both_paths(monkeypatch, src, tmp_path, env)
    qemu_check(fast)
    qemu_compare(src, fast)
    assert fast.read_bytes() == staged.read_bytes()
    for key in ("virtual_size", "bytes_read", "data_clusters", "zero_bytes_skipped", "output_size"):
        assert s_fast[key] == s_staged[key], key
    assert s_fast["source_bytes_fetched"] >= size
    assert leftovers(tmp_path) == []


async def test_raw_output_is_the_source_and_sparse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = make_raw(tmp_path / "disk.raw", 6 * MiB + 512, seed=5)
    fast, staged, s_fast, _ = await both_paths(
        monkeypatch, src, tmp_path, {**CHUNK, "IMGPIPE_OUTPUT_FORMAT": "raw"}
    )
    assert fast.read_bytes() == src.read_bytes() == staged.read_bytes()
    assert fast.stat().st_blocks * 512 < src.stat().st_size  # zero runs stayed holes
    assert s_fast["zero_bytes_skipped"] > 0


async def test_other_jobs_keep_the_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = make_raw(tmp_path / "disk.raw", 3 * MiB, seed=1)
    calls = spy(monkeypatch)
    await convert(str(src), str(tmp_path / "z.qcow2"), from_env({}, progress=False, compress="zstd"))
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    await convert(str(empty), str(tmp_path / "e.qcow2"), from_env({}, progress=False))
    assert calls == []


def fail_after(
    monkeypatch: pytest.MonkeyPatch, name: str, calls: int, action: Callable[[], None]
) -> threading.Event:
    """Wrap localcopy's `name` (pread_full or pwritev_all) to run `action` on its calls-th call."""
    real = getattr(localcopy, name)
    seen = [0]
    lock = threading.Lock()
    fired = threading.Event()

    def wrapped(*args: Any) -> Any:
        with lock:
            seen[0] += 1
            now = seen[0] == calls
        if now:
            fired.set()
            action()
        return real(*args)

    monkeypatch.setattr(localcopy, name, wrapped)
    return fired


async def test_a_file_that_shrinks_mid_read_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = make_raw(tmp_path / "disk.raw", 8 * MiB, seed=3)
    dst = tmp_path / "out.qcow2"
    fired = fail_after(monkeypatch, "pread_full", 10, lambda: os.truncate(src, 2 * MiB))
    with pytest.raises(SourceError, match="changed while read") as info:
        await convert(str(src), str(dst), from_env(CHUNK, progress=False))
    assert fired.is_set()
    assert info.value.stage == "source"
    assert not dst.exists()
    assert leftovers(tmp_path) == []


async def test_a_failed_write_stops_every_worker_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = make_raw(tmp_path / "disk.raw", 8 * MiB, seed=4, data_fraction=0.9)
    dst = tmp_path / "out.qcow2"

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fail_after(monkeypatch, "pwritev_all", 5, disk_full)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(SinkError, match="No space left on device") as info:
        await convert(str(src), str(dst), from_env(CHUNK, progress=False))
    assert info.value.stage == "sink"
    assert not dst.exists()
    assert leftovers(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("localcopy") and t.name not in before]


async def cancel_while_held(
    job: asyncio.Task[Any], held: threading.Event, release: threading.Event, settle: float = 0.2
) -> None:
    """Once a thread of `job` is held (`held` set), cancel the job and check that it still waits for
    that thread; then let the thread go: the job must end cancelled."""
    assert await asyncio.to_thread(held.wait, 10)
    job.cancel()
    await asyncio.sleep(settle)
    assert not job.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await job


async def test_cancelled_mid_copy_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = make_raw(tmp_path / "disk.raw", 16 * MiB, seed=6)
    dst = tmp_path / "out.qcow2"
    started = threading.Event()
    release = threading.Event()

    def stall() -> None:  # hold one worker inside a read until the job has been cancelled
        started.set()
        release.wait(10)

    fail_after(monkeypatch, "pread_full", 3, stall)
    job = asyncio.create_task(convert(str(src), str(dst), from_env(CHUNK, progress=False)))
    # The job still waits for the stalled worker before it lets the output go.
    await cancel_while_held(job, started, release)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


async def test_a_cancelled_thread_call_is_waited_for() -> None:
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(10)
        ended.set()
        return 1

    await cancel_while_held(asyncio.create_task(to_thread_to_end(slow)), started, release, settle=0.1)
    assert ended.is_set()


async def test_the_stage_paths_sink_waits_for_its_writes_when_cancelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cancelled job must not close the output under a write still running on a thread: the
    descriptor's number could be the next file's by then."""
    import pipeline.sinks.file as file_sink

    src = make_raw(tmp_path / "disk.raw", 16 * MiB, seed=7, data_fraction=0.9)
    dst = tmp_path / "out.qcow2"
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = file_sink.pwritev_all

    def stalled(*args: Any) -> int:
        if not started.is_set():
            started.set()
            release.wait(10)
            n = real(*args)
            finished.set()
            return n
        return real(*args)

    monkeypatch.setattr(file_sink, "pwritev_all", stalled)
    # zstd clusters: not the local raw path, so the stages' sink does the writing
    job = asyncio.create_task(convert(str(src), str(dst), from_env(CHUNK, progress=False, compress="zstd")))
    await cancel_while_held(job, started, release)
    assert finished.is_set()
    assert not dst.exists()
    assert leftovers(tmp_path) == []
