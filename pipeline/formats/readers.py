"""The two ImageReaders: ranged (any offset, through the source's ranged reads) and stream (forward only).

The stream reader is what makes sparse formats work without ranges (stdin, a server without Range
support, and later the inside of gzip or tar): it walks the chunk queue forward and keeps a bounded
window of bytes it skipped over, plus the last bytes it handed out, so tables and data that come a
little out of order are still found. A layout that needs bytes it has let go of is refused with the
remedy (a range-capable source, a larger IMGPIPE_REORDER_BUFFER), never silently mis-read.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Awaitable, Callable

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import Chunk
from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage
from pipeline.formats.layout import ImageReader
from pipeline.settings import MiB
from pipeline.sources.base import Source

KEEP_LAST = 64 * 1024  # always kept: packed compressed clusters overlap their neighbours by < 1 sector


def _truncated(offset: int, length: int, size: int | None) -> CorruptImage:
    return CorruptImage(
        f"image is truncated or a table points past its end: bytes {offset}-{offset + length - 1} "
        f"are needed but the file has {size} bytes"
    )


def bare_name(name: str) -> bool:
    """A sibling object's name: one path component, no scheme, no parent reference."""
    return bool(name) and not any(c in name for c in "/\\\0") and name not in (".", "..") and ":" not in name


class RangedReader(ImageReader):
    def __init__(
        self,
        source: Source,
        prefix: bytes = b"",
        on_bytes: Callable[[int], None] | None = None,
        open_sibling: Callable[[str], Awaitable[ImageReader]] | None = None,
    ) -> None:
        self.source = source
        self.size = source.size
        self.ranged = True
        self.prefix = prefix  # the first bytes, already fetched (HTTP's first response)
        self.on_bytes = on_bytes
        self._open_sibling = open_sibling

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or (self.size is not None and offset + length > self.size):
            raise _truncated(offset, length, self.size)

    async def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        await self.read_into(offset, memoryview(out))
        return bytes(out)

    async def read_into(self, offset: int, view: memoryview) -> None:
        length = len(view)
        self._check(offset, length)
        if offset < len(self.prefix):
            # The first response's bytes are already here: use them, fetch only the rest.
            n = min(length, len(self.prefix) - offset)
            view[:n] = self.prefix[offset : offset + n]
            offset, view, length = offset + n, view[n:], length - n
            if not length:
                return
        got = await self.source.read_into(offset, view)
        if got != length:
            raise _truncated(offset, length, offset + got)
        if self.on_bytes is not None:
            self.on_bytes(length)

    async def sibling(self, name: str) -> ImageReader:
        if not bare_name(name):
            raise UnsafeImage(f"refusing to read {name!r}: a sibling must be a bare file name")
        if self._open_sibling is None:
            return await super().sibling(name)
        return await self._open_sibling(name)


class StreamReader(ImageReader):
    """Forward-only reads over the chunk queue, with a bounded window of skipped bytes."""

    def __init__(
        self,
        chunks: ClosableQueue[Chunk],
        size: int | None,
        window: int,
        held: list[Chunk] | None = None,
    ) -> None:
        self.chunks = chunks
        self.size = size
        self.ranged = False
        self.window = window
        self.pos = 0  # file offset of the next byte not yet passed
        self._cur: Chunk | None = None
        self._cur_off = 0  # position inside _cur
        self._held: deque[Chunk] = deque(held or [])
        self._eof = False
        # Skipped and recently read bytes: (file offset, bytes), oldest first, at most `window` + KEEP_LAST.
        # Kept segments in stream order (so ascending offsets); evicted from the front by advancing
        # _first, compacted now and then. Parallel lists so a backward read can bisect the offsets.
        self._kept_offs: list[int] = []
        self._kept_data: list[bytes] = []
        self._first = 0
        self._kept_bytes = 0
        self._kept_total = 0  # bytes ever kept, and bytes served again from the window: a layout
        self._served_again = 0  # that reads kept bytes more than once maps them twice (amplification)
        self.lost_below = 0  # bytes before this may have been dropped from the window

    async def _next_chunk(self) -> bool:
        if self._cur is not None:
            self._cur.release()
            self._cur = None
        if self._held:
            self._cur = self._held.popleft()
        elif not self._eof:
            self._cur = await self.chunks.get()
            if self._cur is None:
                self._eof = True
        self._cur_off = 0
        return self._cur is not None

    def _keep(self, offset: int, data: bytes) -> None:
        if not data:
            return
        self._kept_offs.append(offset)
        self._kept_data.append(data)
        self._kept_bytes += len(data)
        self._kept_total += len(data)
        while self._kept_bytes > self.window + KEEP_LAST and self._first < len(self._kept_offs):
            off, old = self._kept_offs[self._first], self._kept_data[self._first]
            self._kept_data[self._first] = b""
            self._first += 1
            self._kept_bytes -= len(old)
            self.lost_below = off + len(old)
        if self._first > 1024 and self._first * 2 > len(self._kept_offs):
            del self._kept_offs[: self._first], self._kept_data[: self._first]
            self._first = 0

    async def _take(self, length: int, dest: memoryview | None, keep: bool) -> None:
        """Pass `length` bytes of the stream: copy into `dest` (if any), and keep them if `keep`."""
        done = 0
        start = self.pos
        while done < length:
            if (self._cur is None or self._cur_off >= self._cur.length) and not await self._next_chunk():
                raise _truncated(start, length, self.pos if self.size is None else self.size)
            assert self._cur is not None
            n = min(length - done, self._cur.length - self._cur_off)
            src = self._cur.view(self._cur_off, self._cur_off + n)
            if dest is not None:
                dest[done : done + n] = src
            if keep:
                self._keep(self.pos, bytes(src))
            src.release()
            self._cur_off += n
            self.pos += n
            done += n

    def _from_kept(self, offset: int, dest: memoryview) -> None:
        """Copy [offset, offset + len(dest)) from the window, which must hold all of it."""
        end = offset + len(dest)
        need = offset
        offs, datas = self._kept_offs, self._kept_data
        for k in range(max(self._first, bisect.bisect_right(offs, offset, self._first) - 1), len(offs)):
            off, data = offs[k], datas[k]
            if off > need:
                break  # a gap: those bytes were never kept, or were let go
            if off + len(data) <= need:
                continue
            n = min(off + len(data), end) - need
            dest[need - offset : need - offset + n] = data[need - off : need - off + n]
            need += n
            if need == end:
                self._served_again += len(dest)
                if self._served_again > self._kept_total:
                    raise CorruptImage(
                        "the image's tables map the same bytes at several guest offsets; "
                        "refusing the amplification"
                    )
                return
        raise UnsupportedImage(
            f"this image's layout needs bytes at offset {offset} again after the stream has passed them "
            f"(its tables or data are far out of order); convert it from a range-capable source (a file, "
            f"S3, or HTTP with Range support) or raise IMGPIPE_REORDER_BUFFER (now {self.window // MiB} MiB)"
        )

    async def _read(self, offset: int, dest: memoryview, keep_tail: bool) -> None:
        length = len(dest)
        if self.size is not None and offset + length > self.size:
            raise _truncated(offset, length, self.size)
        if offset < self.pos:
            back = min(length, self.pos - offset)
            self._from_kept(offset, dest[:back])
            offset += back
            dest = dest[back:]
            length -= back
            if not length:
                return
        if offset > self.pos:
            gap = offset - self.pos
            if gap > self.window:
                # Only the last `window` bytes of the gap can be kept; pass the rest without copying.
                await self._take(gap - self.window, None, False)
                self.lost_below = self.pos
            await self._take(offset - self.pos, None, True)
        if keep_tail and length > KEEP_LAST:
            await self._take(length - KEEP_LAST, dest[: length - KEEP_LAST], False)
            await self._take(KEEP_LAST, dest[length - KEEP_LAST :], True)
        else:
            await self._take(length, dest, keep_tail)

    async def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        await self._read(offset, memoryview(out), True)
        return bytes(out)

    async def read_into(self, offset: int, view: memoryview) -> None:
        await self._read(offset, view, True)

    async def drain(self) -> int:
        """Pass the rest of the stream (trailing tables, footers); return the file's total size."""
        while True:
            if self._cur is not None:
                self.pos += self._cur.length - self._cur_off
                self._cur_off = self._cur.length
            if not await self._next_chunk():
                break
        self._kept_offs.clear()
        self._kept_data.clear()
        self._first = 0
        self._kept_bytes = 0
        return self.pos

    def release(self) -> None:
        if self._cur is not None:
            self._cur.release()
            self._cur = None
        while self._held:
            self._held.popleft().release()
