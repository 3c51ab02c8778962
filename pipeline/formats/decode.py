"""The decode stage for sparse formats: a decoder's pieces become guest windows for zero-skip.

The guest disk is cut into windows of `chunk_size` bytes (whole output clusters). A window with no
stored piece travels as one zero extent, without a buffer. Any other window gets a pooled buffer:
plain pieces are read straight into their place in it (neighbours that are contiguous in the file
become one read), codec pieces are read as one range per run and decoded on a worker thread, and
the holes are zero-filled. With a ranged reader several windows are read at once and passed on in
order; a stream reader is forward only, so one at a time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import CorruptImage
from pipeline.formats.layout import Decoder, ImageReader, Piece
from pipeline.messages import Batch, Extent
from pipeline.stats import JobStats


@dataclass(slots=True)
class Part:
    """The slice [skip, skip + take) of a piece's guest bytes, at `at` in its window."""

    piece: Piece
    at: int
    skip: int
    take: int


async def windows(decoder: Decoder, size: int, step: int) -> AsyncIterator[tuple[int, int, list[Part]]]:
    """(window start, window length, parts) for every window of [0, size), checking the pieces. A run
    of windows with no parts comes as one entry of their total length."""
    pos = 0  # guest offset every later piece must start at or after
    start = 0
    parts: list[Part] = []
    file_size = decoder.reader.size
    stored_plain = stored_codec = 0
    async for p in decoder.pieces():
        if p.length <= 0 or p.guest < pos or p.guest + p.length > size:
            raise CorruptImage(
                f"{decoder.format}: a table maps guest bytes {p.guest}-{p.guest + p.length - 1} out of "
                f"order, twice, or beyond the {size}-byte disk"
            )
        if not p.zero:
            # A codec piece's stored length is an upper bound that may pass the end (sector rounding).
            end = p.file + (1 if p.codec else p.length)
            if p.file < 0 or (p.codec and p.stored <= 0) or (file_size is not None and end > file_size):
                raise CorruptImage(
                    f"{decoder.format}: guest bytes at {p.guest} are mapped to file offset {p.file}, "
                    f"outside the {file_size}-byte file"
                )
        pos = p.guest + p.length
        if p.zero:
            continue
        # Each stored byte may back one guest byte: tables that map one cluster at many guest offsets
        # would turn a tiny upload into terabytes of output (a compressed run needs some bytes too).
        if p.codec:
            stored_codec += 1
        else:
            stored_plain += p.length
        if file_size is not None and stored_plain + MIN_CODEC_BYTES * stored_codec > file_size:
            raise CorruptImage(
                f"{decoder.format}: the tables map more stored data than the {file_size}-byte file holds "
                "(the same clusters at several guest offsets); refusing the amplification"
            )
        skip = 0
        while skip < p.length:
            g = p.guest + skip
            if g >= start + step:
                if parts:
                    yield start, min(step, size - start), parts
                    parts = []
                    start += step
                # Whole windows with nothing stored travel as one zero run, however long.
                empty = (g - start) // step * step
                if empty:
                    yield start, empty, []
                    start += empty
            take = min(p.length - skip, start + step - g)
            parts.append(Part(p, g - start, skip, take))
            skip += take
    if parts:
        yield start, min(step, size - start), parts
        start += step
    if start < size:
        yield start, size - start, []


_ZEROS = bytes(1024 * 1024)
MIN_CODEC_BYTES = 8  # no compressed cluster or grain takes fewer bytes of the file
# Bytes between two needed ranges that are cheaper to fetch than a second request (a table between
# data runs, a cluster whose subclusters are all zero); bytes are still never fetched twice.
READ_THROUGH_GAP = 256 * 1024


def _zero_fill(chunk: Chunk, a: int, b: int) -> None:
    while a < b:
        n = min(b - a, len(_ZEROS))
        chunk.space(a, a + n)[:] = _ZEROS[:n]
        a += n


def _decode_all(decoder: Decoder, jobs: list[tuple[Part, memoryview]], chunk: Chunk) -> None:
    """Runs on a worker thread: decode codec pieces and copy their parts into the window."""
    for part, stored in jobs:
        p = part.piece
        data = decoder.decode(p, stored)
        if len(data) != p.length:
            raise CorruptImage(
                f"{decoder.format}: a compressed run at guest {p.guest} decodes to "
                f"{len(data)} bytes, not {p.length}"
            )
        chunk.space(part.at, part.at + part.take)[:] = memoryview(data)[part.skip : part.skip + part.take]


async def fill_window(
    decoder: Decoder, reader: ImageReader, chunk: Chunk, length: int, parts: list[Part]
) -> Chunk:
    try:
        await _fill(decoder, reader, chunk, length, parts)
    except BaseException:
        chunk.release()
        raise
    return chunk


async def _fill(decoder: Decoder, reader: ImageReader, chunk: Chunk, length: int, parts: list[Part]) -> None:
    chunk.length = length
    filled = 0
    jobs: list[tuple[Part, memoryview]] = []
    size = reader.size
    # A forward-only reader keeps what it skips, not what it reads: never read through a gap there,
    # the gap may hold the data of a later window (qemu packs compressed clusters before plain ones).
    gap = READ_THROUGH_GAP if reader.ranged else 0
    i = 0
    while i < len(parts):
        # The parts that go on forward in the file, across at most a small gap of bytes we do not
        # need (compressed runs may overlap by part of a sector): one request for all of them.
        first = parts[i]
        lo = first.piece.file + (first.skip if not first.piece.codec else 0)
        hi = lo + (first.take if not first.piece.codec else first.piece.stored)
        direct = not first.piece.codec
        j = i + 1
        while j < len(parts):
            q = parts[j]
            q_lo = q.piece.file + (q.skip if not q.piece.codec else 0)
            if not lo <= q_lo <= hi + gap:
                break
            q_hi = q_lo + (q.take if not q.piece.codec else q.piece.stored)
            direct = direct and not q.piece.codec and q_lo == hi and q.at == first.at + (hi - lo)
            hi = max(hi, q_hi)
            j += 1
        if size is not None:
            hi = min(hi, size)  # a last compressed cluster's sector count may pass the end
        if direct:
            # Plain bytes contiguous in the file and in the window: straight into place.
            if first.at > filled:
                _zero_fill(chunk, filled, first.at)
            await reader.read_into(lo, chunk.space(first.at, first.at + hi - lo))
            filled = first.at + hi - lo
            i = j
            continue
        scratch = memoryview(bytearray(hi - lo))
        await reader.read_into(lo, scratch)
        for k in range(i, j):
            q = parts[k]
            if q.at > filled:
                _zero_fill(chunk, filled, q.at)
            off = q.piece.file - lo
            if q.piece.codec:
                jobs.append((q, scratch[off : off + q.piece.stored]))
            else:
                off += q.skip
                chunk.space(q.at, q.at + q.take)[:] = scratch[off : off + q.take]
            filled = q.at + q.take
        i = j
    if filled < length:
        _zero_fill(chunk, filled, length)
    if jobs:
        await asyncio.to_thread(_decode_all, decoder, jobs, chunk)


async def decode_stage(
    decoder: Decoder,
    pool: BufferPool,
    outq: ClosableQueue[Batch],
    concurrency: int,
    stats: JobStats,
    on_end: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Walk the decoder's windows in guest order and pass them on, `concurrency` reads at a time.

    `on_end` runs after the last window and before the output queue closes: a failure there still
    stops the output from being committed."""
    reader = decoder.reader
    size = decoder.info.virtual_size
    stats.virtual_size = size
    async with asyncio.TaskGroup() as tg:
        inflight: deque[tuple[int, int, asyncio.Task[Chunk] | None]] = deque()

        async def pass_oldest() -> None:
            start, length, pending = inflight.popleft()
            if pending is None:
                await outq.put(Batch([Extent(start, length)]))
                return
            chunk = await pending
            await outq.put(Batch([Extent(start, length, chunk, chunk.base)], [chunk]))

        try:
            async for start, length, parts in windows(decoder, size, pool.size):
                if not parts:
                    inflight.append((start, length, None))
                elif not reader.ranged:
                    # Forward only: the window's reads must not interleave with the decoder's.
                    while inflight:
                        await pass_oldest()
                    chunk = await fill_window(decoder, reader, await pool.chunk(), length, parts)
                    await outq.put(Batch([Extent(start, length, chunk, chunk.base)], [chunk]))
                    continue
                else:
                    chunk = await pool.chunk()
                    task = tg.create_task(fill_window(decoder, reader, chunk, length, parts))
                    inflight.append((start, length, task))
                while len(inflight) > concurrency or (inflight and inflight[0][2] is None):
                    await pass_oldest()
            while inflight:
                await pass_oldest()
        finally:
            for _, _, left in inflight:
                if left is not None and left.done() and not left.cancelled() and left.exception() is None:
                    left.result().release()
    if on_end is not None:
        await on_end()
    await outq.close()
