"""Local files (written under a temporary name beside DST, renamed on success) and pipes/stdout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

import aiofiles.os

from pipeline.aqueue import ClosableQueue
from pipeline.errors import SinkError, UsageError
from pipeline.messages import Finish, Writes
from pipeline.settings import Settings
from pipeline.sinks.base import Sink
from pipeline.threads import to_thread_to_end

IOV_MAX = 1024
WRITES_IN_FLIGHT = 4
_ZEROS = bytes(1024 * 1024)
PARTIAL_SUFFIX = ".imgpipe-partial"
# Unnamed files (Linux O_TMPFILE) are named at the end through /proc/self/fd.
_CAN_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def pwritev_all(fd: int, bufs: list[bytes | memoryview], offset: int) -> int:
    total = 0
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        batch = views[:IOV_MAX]
        n = os.pwritev(fd, batch, offset)
        total += n
        offset += n
        # Drop what was written (short writes are rare on regular files, but legal).
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return total


Extents = list[tuple[int, list[bytes | memoryview]]]  # (file offset, buffers that follow each other)


def place(items: list[bytes | memoryview | int], pos: int) -> tuple[Extents, int]:
    """Output items from file offset `pos`, as positional writes of contiguous buffers (a zero run,
    an int, leaves a hole between them); and the offset after the last item."""
    extents: Extents = []
    bufs: list[bytes | memoryview] = []
    start = pos
    for piece in items:
        if isinstance(piece, int):
            if bufs:
                extents.append((start, bufs))
                bufs = []
            pos += piece
            start = pos
        else:
            bufs.append(piece)
            pos += len(piece)
    if bufs:
        extents.append((start, bufs))
    return extents, pos


def _name_unnamed(fd: int, path: str) -> None:
    """linkat(AT_SYMLINK_FOLLOW) through /proc/self/fd. A dir fd is passed on purpose: with none,
    CPython calls plain link(), which links the magic symlink itself and fails with EXDEV."""
    proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), path, src_dir_fd=proc_fd, follow_symlinks=True)
    finally:
        os.close(proc_fd)


class FileSink(Sink):
    def __init__(self, spec: str, settings: Settings) -> None:
        super().__init__(spec, settings)
        self.path = os.path.abspath(spec)
        self.tmp: str | None = None
        self.fd = -1
        self._fin: Finish | None = None

    async def open(self, reserve: int) -> None:
        await super().open(reserve)
        parent = os.path.dirname(self.path)
        if not await aiofiles.os.path.isdir(parent):
            raise UsageError(f"{self.spec}: directory {parent} does not exist")
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # the usual umask-derived mode, as cp would give
        try:
            # An unnamed file in DST's directory: if the process dies (even by SIGKILL) the kernel frees
            # it and nothing is left behind. It gets a name only when complete (see _commit).
            if _CAN_TMPFILE:
                with contextlib.suppress(OSError):  # filesystems without O_TMPFILE: a named temp file
                    self.fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY, mode)
            if self.fd < 0:
                # Beside DST so the final rename is atomic (same filesystem).
                self.fd, self.tmp = tempfile.mkstemp(
                    prefix=f".{os.path.basename(self.path)}.", suffix=PARTIAL_SUFFIX, dir=parent
                )
                os.fchmod(self.fd, mode)  # mkstemp makes 0600 files
        except OSError as exc:
            raise SinkError(f"{self.spec}: cannot create a file in {parent}: {exc.strerror}") from None

    async def run(self, inq: ClosableQueue[Writes | Finish]) -> None:
        # Positional writes need no ordering, so several run at once: measured here, two threads
        # fill the page cache 2-4x faster than one.
        pos = self.reserve
        slots = asyncio.Semaphore(WRITES_IN_FLIGHT)
        async with asyncio.TaskGroup() as tg:
            async for item in inq:
                if isinstance(item, Finish):
                    fin = item
                    break
                extents, pos = place(item.items, pos)
                await slots.acquire()
                tg.create_task(self._write(extents, item, slots))
            else:
                raise SinkError(f"{self.spec}: the output stream ended without its end marker")
        await self.complete(fin)

    async def complete(self, fin: Finish) -> None:
        """Everything but the header is written: commit now, or hold it for a deferred commit."""
        if self.deferred:
            self._fin = fin
            return
        await self._commit(fin)

    async def commit(self) -> None:
        if self._fin is None:
            raise SinkError(f"{self.spec}: commit before the output was complete")
        await self._commit(self._fin)

    async def _write(self, extents: Extents, item: Writes, slots: asyncio.Semaphore) -> None:
        try:
            for offset, bufs in extents:
                await to_thread_to_end(pwritev_all, self.fd, bufs, offset)
        except OSError as exc:
            raise SinkError(f"{self.spec}: write failed: {exc.strerror or exc}") from None
        finally:
            slots.release()
        item.release()

    async def _commit(self, fin: Finish) -> None:
        fd = self.fd

        def finish() -> None:
            if fin.head:
                os.pwrite(fd, fin.head, 0)
            os.ftruncate(fd, fin.output_size)  # trailing holes of a raw image
            if self.settings.fsync:
                os.fsync(fd)

        try:
            await to_thread_to_end(finish)
            if self.tmp is None:
                # Name the unnamed file beside DST, then rename over DST (atomic, replaces an old one).
                self.tmp = os.path.join(
                    os.path.dirname(self.path),
                    f".{os.path.basename(self.path)}.{os.urandom(6).hex()}{PARTIAL_SUFFIX}",
                )
                _name_unnamed(fd, self.tmp)
            os.close(fd)
            self.fd = -1
            await aiofiles.os.replace(self.tmp, self.path)
        except OSError as exc:
            raise SinkError(f"{self.spec}: cannot finish the output: {exc.strerror or exc}") from None
        self.tmp = None
        self.committed = True
        self.written = fin.output_size

    async def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self.tmp)
            self.tmp = None
        if self.committed and self.deferred:
            # One output of a package whose later output failed: the package goes as a whole.
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self.path)
            self.committed = False


class StreamSink(Sink):
    """stdout or a pipe: raw only, strictly sequential, zero runs written as zeros."""

    can_defer = False

    def __init__(self, spec: str, settings: Settings, fd: int | None = None) -> None:
        super().__init__(spec, settings)
        self.fd = fd if fd is not None else -1
        self._own = fd is None

    async def open(self, reserve: int) -> None:
        await super().open(reserve)
        if reserve:
            raise UsageError("qcow2 cannot be written to a pipe; use --output-format raw")
        if self._own:
            try:
                self.fd = os.open(self.spec, os.O_WRONLY)
            except OSError as exc:
                raise SinkError(f"{self.spec}: cannot open for writing: {exc.strerror}") from None

    def _write_all(self, bufs: list[bytes | memoryview | int]) -> int:
        total = 0
        for b in bufs:
            if isinstance(b, int):
                left = b
                while left:
                    n = os.write(self.fd, memoryview(_ZEROS)[: min(left, len(_ZEROS))])
                    left -= n
                    total += n
                continue
            mv = memoryview(b).cast("B")
            while mv:
                n = os.write(self.fd, mv)
                mv = mv[n:]
                total += n
        return total

    async def run(self, inq: ClosableQueue[Writes | Finish]) -> None:
        async for item in inq:
            if isinstance(item, Finish):
                self.committed = True
                continue
            try:
                self.written += await to_thread_to_end(self._write_all, item.items)
            except BrokenPipeError:
                raise SinkError(f"{self.spec}: the reader closed the pipe") from None
            except OSError as exc:
                raise SinkError(f"{self.spec}: write failed: {exc.strerror or exc}") from None
            item.release()

    async def abort(self) -> None:
        # Bytes already in a pipe cannot be recalled; the non-zero exit status tells the reader.
        if self._own and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
