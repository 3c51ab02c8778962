"""The source interface and the ranged reader that HTTP and S3 share.

A source delivers the image as pooled chunks of exactly `pool.size` bytes (the last may be shorter),
in order, into a bounded queue. A source that can serve byte ranges also answers `read_range` (used to
read a VHD footer first, and by sparse decoders to read their tables).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from pipeline import log
from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import SourceChanged, SourceError
from pipeline.settings import Settings

if TYPE_CHECKING:
    # The zero-copy HTTP client is the HTTP and S3 sources' (they import it); a file source never loads it.
    from pipeline.sources.rangeio import Head, RangeClient

OnBytes = Callable[[int], None]


class TransientReadError(Exception):
    """A read that may succeed if retried from where it stopped (dropped connection, 5xx)."""

    received = 0  # body bytes that had landed before the failure


class Source(ABC):
    def __init__(self, spec: str, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.size: int | None = None
        self.ranged = False
        self.etag: str | None = None
        # Counters the tests (and issue 3's byte accounting) read: requests made, body bytes fetched.
        self.requests = 0
        self.bytes_fetched = 0

    @abstractmethod
    async def open(self) -> None:
        """Learn size, version (ETag) and range support; raise SourceError if unreadable."""

    @abstractmethod
    async def produce(self, pool: BufferPool, out: ClosableQueue[Chunk], on_bytes: OnBytes) -> None:
        """Put the whole image into `out` as chunks, then close it."""

    async def read_range(self, offset: int, length: int) -> bytes:
        raise SourceError(f"{self.spec}: this source cannot read byte ranges")

    async def read_into(self, offset: int, view: memoryview) -> int:
        """Fill `view` from `offset`; returns the bytes that landed (short only at the end)."""
        data = await self.read_range(offset, len(view))
        view[: len(data)] = data
        return len(data)

    async def peek_head(self, pool: BufferPool) -> bytes:
        """Bytes from offset 0 that are already here (no request made); empty for most sources."""
        return b""

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Source:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RangedSource(Source):
    """Concurrent ranged reads reassembled in order, each resumed from its last byte on a drop.

    Subclasses provide `_range_pieces(start, end)`: the body of one ranged request pinned to the
    version first seen, raising TransientReadError for failures worth retrying and SourceChanged /
    SourceError for the rest.
    """

    _stashed: Chunk | None = None

    @abstractmethod
    def _range_pieces(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Body bytes of [start, end) of the pinned version, as they arrive."""

    async def _first_chunk(self, pool: BufferPool) -> Chunk | None:
        """Hook: a subclass that already holds the first response body returns it as a chunk."""
        return None

    async def peek_head(self, pool: BufferPool) -> bytes:
        """The bytes the first response already brought (HTTP), for sniffing without a second request;
        produce() still delivers them as its first chunk."""
        first = await self._first_chunk(pool)
        if first is None:
            return b""
        self._stashed = first
        return bytes(first.view())

    async def _read_into(self, view: memoryview, offset: int) -> int:
        """One request for bytes [offset, offset + len(view)) into `view`; returns the bytes that
        landed. A TransientReadError carries in `.received` how many landed before it."""
        got = 0
        length = len(view)
        try:
            async with contextlib.aclosing(self._range_pieces(offset, offset + length)) as body:
                async for piece in body:
                    n = len(piece)
                    if got + n > length:
                        raise SourceError(
                            f"{self.spec}: server sent more bytes than the range "
                            f"{offset}-{offset + length - 1} it announced"
                        )
                    view[got : got + n] = piece
                    got += n
        except TransientReadError as exc:
            exc.received = got
            raise
        return got

    async def _fast_get(
        self, client: RangeClient, headers: dict[str, str], view: memoryview, path_qs: str | None = None
    ) -> tuple[Head, int] | None:
        """One ranged GET through the zero-copy client (rangeio) into `view`. None: the answer is one
        that client does not frame, and the caller should use its general client from now on."""
        from pipeline.sources.rangeio import RangeIOError, Unframed

        self.requests += 1
        try:
            return await client.get(headers, view, path_qs)
        except RangeIOError as exc:
            err = TransientReadError(str(exc))
            err.received = exc.received
            raise err from None
        except Unframed as exc:
            log.get(stage="source").info("ranged reads fall back to the general client", reason=str(exc))
            return None

    async def _fill(self, chunk: Chunk, offset: int, length: int) -> Chunk:
        view = chunk.space(0, length)
        try:
            await self._fill_view(view, offset)
        finally:
            view.release()
        chunk.length = length
        return chunk

    async def read_into(self, offset: int, view: memoryview) -> int:
        await self._fill_view(view, offset)
        return len(view)

    async def _fill_view(self, view: memoryview, offset: int) -> None:
        """Fill all of `view` with bytes [offset, offset + len(view)), resuming after drops."""
        length = len(view)
        got = 0
        failures = 0
        while got < length:
            try:
                n = await self._read_into(view[got:], offset + got)
                got += n
                self.bytes_fetched += n
                if got < length:
                    raise TransientReadError(f"body ended after {got} of {length} bytes")
            except TransientReadError as exc:
                got += exc.received
                self.bytes_fetched += exc.received
                exc.received = 0
                failures += 1
                if failures > self.settings.retries:
                    raise SourceError(
                        f"{self.spec}: reading bytes {offset + got}-{offset + length - 1} failed "
                        f"{failures} times, last: {exc}"
                    ) from None
                await asyncio.sleep(self.settings.retry_backoff * 2 ** (failures - 1))

    async def read_range(self, offset: int, length: int) -> bytes:
        chunk = Chunk(None, bytearray(length), 0)
        await self._fill(chunk, offset, length)
        return bytes(chunk.view())

    async def produce(self, pool: BufferPool, out: ClosableQueue[Chunk], on_bytes: OnBytes) -> None:
        assert self.size is not None
        size, step = self.size, pool.size
        first, self._stashed = self._stashed, None
        if first is None:
            first = await self._first_chunk(pool)
        next_off = 0
        if first is not None:
            next_off = first.length
            on_bytes(first.length)
            await out.put(first)
        async with asyncio.TaskGroup() as tg:
            window: deque[asyncio.Task[Chunk]] = deque()
            while next_off < size or window:
                while next_off < size and len(window) < self.settings.read_concurrency:
                    n = min(step, size - next_off)
                    chunk = await pool.chunk()
                    window.append(tg.create_task(self._fill(chunk, next_off, n)))
                    next_off += n
                done = await window.popleft()
                on_bytes(done.length)
                await out.put(done)
        await out.close()


class ChunkFiller:
    """Packs pieces of arbitrary size into full pooled chunks (copying is unavoidable for sockets)."""

    def __init__(self, pool: BufferPool, out: ClosableQueue[Chunk], on_bytes: OnBytes) -> None:
        self.pool = pool
        self.out = out
        self.on_bytes = on_bytes
        self.cur: Chunk | None = None
        self.total = 0

    async def feed(self, piece: bytes | memoryview) -> None:
        mv = memoryview(piece)
        while mv:
            if self.cur is None:
                self.cur = await self.pool.chunk()
            c = self.cur
            take = min(len(mv), self.pool.size - c.length)
            c.space(c.length, c.length + take)[:] = mv[:take]
            c.length += take
            mv = mv[take:]
            self.total += take
            if c.length == self.pool.size:
                self.cur = None
                self.on_bytes(c.length)
                await self.out.put(c)

    async def finish(self) -> None:
        if self.cur is not None and self.cur.length:
            self.on_bytes(self.cur.length)
            await self.out.put(self.cur)
        self.cur = None
        await self.out.close()


def check_same_version(spec: str, pinned: str | None, seen: str | None) -> None:
    if pinned and seen and pinned != seen:
        raise SourceChanged(
            f"{spec} changed while it was being read (ETag {pinned} became {seen}); "
            "run the job again to convert one consistent version"
        )
