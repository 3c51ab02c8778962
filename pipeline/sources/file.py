"""Local files, block devices and stdin ('-')."""

from __future__ import annotations

import asyncio
import os
import stat
from collections import deque
from typing import Any

import aiofiles

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import SourceError
from pipeline.settings import Settings
from pipeline.sources.base import OnBytes, Source

FILE_READS_IN_FLIGHT = 2  # one per core here; more only queued behind the same two copies


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; short only at end of file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    view.release()
    return done


class FileSource(Source):
    def __init__(self, spec: str, settings: Settings) -> None:
        super().__init__(spec, settings)
        self._f: Any = None

    async def open(self) -> None:
        try:
            if self.spec == "-":
                self._f = await aiofiles.open(0, "rb", buffering=0, closefd=False)
            else:
                self._f = await aiofiles.open(self.spec, "rb", buffering=0)
        except FileNotFoundError:
            raise SourceError(f"{self.spec}: no such file") from None
        except IsADirectoryError:
            raise SourceError(f"{self.spec}: is a directory, not an image") from None
        except PermissionError:
            raise SourceError(f"{self.spec}: permission denied") from None
        except OSError as exc:
            raise SourceError(f"{self.spec}: cannot open: {exc.strerror or exc}") from None
        fd = self._f.fileno()
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            self.size, self.ranged = st.st_size, True
        elif stat.S_ISBLK(st.st_mode):
            self.size, self.ranged = os.lseek(fd, 0, os.SEEK_END), True
            os.lseek(fd, 0, os.SEEK_SET)
        elif stat.S_ISDIR(st.st_mode):
            raise SourceError(f"{self.spec}: is a directory, not an image")
        # Pipes and character devices stay sequential with an unknown size.

    def fileno(self) -> int:
        return int(self._f.fileno())

    async def read_range(self, offset: int, length: int) -> bytes:
        if not self.ranged:
            return await super().read_range(offset, length)
        data: bytes = await asyncio.to_thread(os.pread, self._f.fileno(), length, offset)
        self.requests += 1
        self.bytes_fetched += len(data)
        return data

    async def read_into(self, offset: int, view: memoryview) -> int:
        if not self.ranged:
            return await super().read_into(offset, view)
        # pread_full releases the view it gets: hand it its own, the caller keeps using `view`.
        got: int = await asyncio.to_thread(pread_full, self._f.fileno(), view[:], offset)
        self.requests += 1
        self.bytes_fetched += got
        return got

    async def produce(self, pool: BufferPool, out: ClosableQueue[Chunk], on_bytes: OnBytes) -> None:
        if self.ranged and self.size is not None:
            await self._produce_positional(pool, out, on_bytes, self.size)
            return
        eof = False
        total = 0
        while not eof:
            chunk = await pool.chunk()
            mv = chunk.space(0, pool.size)
            # readinto may return short counts (pipes); fill the chunk so every chunk but the last is full.
            while chunk.length < pool.size:
                n = await self._f.readinto(mv[chunk.length :])
                if not n:
                    eof = True
                    break
                chunk.length += n
            mv.release()
            self.bytes_fetched += chunk.length
            total += chunk.length
            if chunk.length:
                on_bytes(chunk.length)
                await out.put(chunk)
            else:
                chunk.release()
        if self.size is not None and total != self.size:
            raise SourceError(
                f"{self.spec}: read {total} bytes but the file had {self.size}; it changed while read"
            )
        await out.close()

    async def _produce_positional(
        self, pool: BufferPool, out: ClosableQueue[Chunk], on_bytes: OnBytes, size: int
    ) -> None:
        """Files and block devices: several preads in flight, passed on in order.

        The kernel's copy out of the page cache is most of a local conversion's work; with one read
        at a time it ran on one core while the other waited.
        """
        fd = self._f.fileno()
        window: deque[tuple[Chunk, asyncio.Future[int]]] = deque()
        offset = 0
        try:
            while offset < size or window:
                while offset < size and len(window) < FILE_READS_IN_FLIGHT:
                    chunk = await pool.chunk()
                    n = min(pool.size, size - offset)
                    view = chunk.space(0, n)
                    window.append(
                        (chunk, asyncio.ensure_future(asyncio.to_thread(pread_full, fd, view, offset)))
                    )
                    offset += n
                chunk, fut = window.popleft()
                chunk.length = await fut
                if chunk.length < min(pool.size, size - self.bytes_fetched):
                    chunk.release()
                    raise SourceError(
                        f"{self.spec}: the file ended at {self.bytes_fetched + chunk.length} bytes, "
                        f"not {size}; it changed while read"
                    )
                self.bytes_fetched += chunk.length
                on_bytes(chunk.length)
                await out.put(chunk)
        finally:
            for chunk, fut in window:
                fut.cancel()
                chunk.release()
        await out.close()

    async def close(self) -> None:
        if self._f is not None:
            await self._f.close()
            self._f = None
