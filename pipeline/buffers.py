"""Pooled chunk buffers: the source's memory is a fixed set of bytearrays reused for the whole job.

Reusing buffers avoids page faults and memsets of fresh allocations on the hot path, and the pool size
is the memory bound: a source that runs ahead waits for a buffer, which is the back-pressure.
"""

from __future__ import annotations

import asyncio


class Chunk:
    """`length` valid bytes of a pooled buffer, released exactly once by its last holder."""

    __slots__ = ("_pool", "buf", "length")

    def __init__(self, pool: BufferPool | None, buf: bytearray, length: int) -> None:
        self._pool = pool
        self.buf = buf
        self.length = length

    def view(self, start: int = 0, stop: int | None = None) -> memoryview:
        end = self.length if stop is None else stop
        return memoryview(self.buf)[start:end]

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.give_back(self.buf)


class BufferPool:
    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.count = count
        # LIFO: the buffer released last is the one still in the CPU cache. Measured here, rotating
        # through 8 buffers FIFO made the kernel's copy into them 1.5-2x slower than reusing one.
        self._free: asyncio.LifoQueue[bytearray] = asyncio.LifoQueue()
        self._made = 0

    async def acquire(self) -> bytearray:
        # Buffers are allocated lazily so a small job never pays for the whole pool.
        if self._free.empty() and self._made < self.count:
            self._made += 1
            return bytearray(self.size)
        return await self._free.get()

    def give_back(self, buf: bytearray) -> None:
        self._free.put_nowait(buf)

    async def chunk(self) -> Chunk:
        return Chunk(self, await self.acquire(), 0)
