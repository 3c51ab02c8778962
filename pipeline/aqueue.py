"""A bounded asyncio queue that its producer can close (asyncio.Queue.shutdown is 3.13+)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _Closed:
    __slots__ = ()


_CLOSED = _Closed()


class ClosableQueue(Generic[T]):
    """Bounded queue; `close()` ends iteration for the consumer once the items before it are taken."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue depth must be at least 1")
        self._q: asyncio.Queue[T | _Closed] = asyncio.Queue(maxsize)
        self._closed = False

    async def put(self, item: T) -> None:
        if self._closed:
            raise RuntimeError("put() on a closed queue")
        await self._q.put(item)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._q.put(_CLOSED)

    async def get(self) -> T | None:
        """Next item, or None once the queue is closed and drained."""
        item = await self._q.get()
        if isinstance(item, _Closed):
            # Leave the marker for any other consumer.
            self._q.put_nowait(item)
            return None
        return item

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[T]:
        while True:
            item = await self.get()
            if item is None:
                return
            yield item
