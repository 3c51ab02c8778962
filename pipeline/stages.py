"""The stages between source and sink. Each does one thing; the runner wires their queues.

    chunks -> sniff -> decode -> zero-skip -> encode -> writes

Every stage closes its output queue when its input ends, so end-of-stream flows down the chain; on
failure the runner's task group cancels them all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import Chunk
from pipeline.errors import NotThisFormat, UnsafeImage
from pipeline.formats import sniff
from pipeline.formats.base import Match
from pipeline.formats.probes import HEAD_BYTES, PROBES, TAIL_BYTES, VHD_FOOTER
from pipeline.formats.registry import DECODERS, decoder_class
from pipeline.messages import Batch, Extent, Finish, Writes
from pipeline.qcow2.compress import make_compressor
from pipeline.qcow2.writer import Qcow2Writer
from pipeline.settings import Settings, TiB
from pipeline.stats import JobStats


async def collect_head(q: ClosableQueue[Chunk], held: list[Chunk]) -> bytes:
    """The first HEAD_BYTES of a chunk stream (fewer if it ends first); the chunks they came in are
    appended to `held`, for the caller to pass on or release."""
    head = bytearray()
    while len(head) < HEAD_BYTES:
        chunk = await q.get()
        if chunk is None:
            break
        held.append(chunk)
        head += chunk.view(0, min(chunk.length, HEAD_BYTES - len(head)))
    return bytes(head)


async def sniff_stage(
    source: Any,  # the source, or the unwrap stage's view of it (pipeline/unwrap.StreamView)
    inq: ClosableQueue[Chunk],
    outq: ClosableQueue[Chunk],
    verdict: asyncio.Future[Match],
    stats: JobStats,
    known_tail: bytes | None = None,
) -> None:
    """Decide the format from the head (and tail) as they stream by, then pass the chunks on.

    Holds a copy of at most HEAD_BYTES + TAIL_BYTES; the chunks themselves are only delayed.
    """
    held: list[Chunk] = []
    head = await collect_head(inq, held)
    eof = len(head) < HEAD_BYTES
    size = source.size
    tail: bytes | None = None
    if size is not None and size <= len(head):
        tail = bytes(head[-TAIL_BYTES:])
    elif eof:
        size = len(head)
        tail = bytes(head[-TAIL_BYTES:])
    elif known_tail is not None:
        tail = known_tail  # read by the runner while planning
    elif size is not None and source.ranged:
        tail = await source.read_range(size - TAIL_BYTES, TAIL_BYTES)
    payload: Match | None = getattr(source, "payload", None)
    match = payload if payload is not None else sniff.decide(head, tail, size)
    stats.source_format, stats.source_detail = match.format, match.detail
    verdict.set_result(match)
    del head
    for chunk in held:
        await outq.put(chunk)
    if tail is None:
        # A sequential source shows its tail only at EOF: keep the last bytes and judge them then.
        last = bytes(held[-1].view(max(0, held[-1].length - TAIL_BYTES))) if held else b""
        total = sum(c.length for c in held)
        async for chunk in inq:
            total += chunk.length
            if chunk.length >= TAIL_BYTES:
                last = bytes(chunk.view(chunk.length - TAIL_BYTES))
            else:
                last = (last + bytes(chunk.view()))[-TAIL_BYTES:]
            await outq.put(chunk)
        sniff.check_tail(last, total)
    else:
        async for chunk in inq:
            await outq.put(chunk)
    await outq.close()


async def raw_decode_stage(
    inq: ClosableQueue[Chunk], outq: ClosableQueue[Batch], settings: Settings, stats: JobStats
) -> None:
    """Raw and ISO: the file is the guest disk, byte for byte.

    The last chunks are held back until EOF, so that a footer-only format seen there (a fixed VHD
    from a sequential source) is trimmed off instead of becoming guest data.
    """
    offset = 0
    cap = settings.max_virtual_size
    held: deque[Chunk] = deque()
    held_bytes = 0
    try:
        async for chunk in inq:
            if offset + held_bytes + chunk.length > cap:
                chunk.release()
                raise UnsafeImage(
                    f"image is larger than the virtual-size cap of {cap / TiB:g} TiB; "
                    "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
                )
            held.append(chunk)
            held_bytes += chunk.length
            while held_bytes - held[0].length >= TAIL_BYTES:
                first = held.popleft()
                held_bytes -= first.length
                await outq.put(Batch([Extent(offset, first.length, first, first.base)], [first]))
                offset += first.length
        total = offset + held_bytes
        end = total
        if held_bytes:
            tail = b"".join(bytes(c.view()) for c in held)[-TAIL_BYTES:]
            guest = _trailing_footer(tail, total)
            if guest is not None:
                stats.source_format, stats.source_detail = "vhd", "fixed"
                end = min(guest, total - VHD_FOOTER)
                stats.virtual_size = guest
        while held:
            chunk = held.popleft()
            n = max(0, min(chunk.length, end - offset))
            if n:
                await outq.put(Batch([Extent(offset, n, chunk, chunk.base)], [chunk]))
            else:
                chunk.release()
            offset += chunk.length
        stats.virtual_size = stats.virtual_size or end
    finally:
        for chunk in held:
            chunk.release()
    await outq.close()


def _trailing_footer(tail: bytes, size: int) -> int | None:
    """The guest size if the stream ended with a footer of a decodable format, else None.

    Only a decoder whose format's tail probe matches is loaded and asked: the end of every raw
    stream passes here, and importing every decoder for it would cost a raw job their start-up."""
    for probe in PROBES:
        if not probe.tail or probe.name not in DECODERS:
            continue
        try:
            probe.probe(b"", tail, size)
        except NotThisFormat:
            continue
        guest = decoder_class(probe.name).trailing_footer(tail, size)
        if guest is not None:
            return guest
    return None


class ZeroSkipper:
    """Splits data extents into runs of data clusters and zero clusters (zero runs carry no bytes).

    Tests a coarse 64 KiB block first so small clusters cost one compare where the disk is empty;
    `bytearray.startswith(zeros, offset)` is a memcmp on the buffer, no copy.
    """

    def __init__(self, cluster_size: int) -> None:
        self.cs = cluster_size
        self.coarse = max(cluster_size, 64 * 1024)
        self.zero_coarse = bytes(self.coarse)
        self.zero_cluster = bytes(cluster_size)
        self.zero_whole = b""  # zeros as long as the last whole extent tested (usually one chunk)

    def split(self, ext: Extent, out: list[Extent]) -> int:
        """Append the runs of `ext` to `out`; return the number of zero bytes found."""
        if ext.chunk is None:
            out.append(ext)
            return ext.length
        buf = ext.chunk.buf
        if ext.length > self.coarse:
            # Most chunks of a typical disk are empty from end to end: one compare instead of one per
            # block (and a data chunk fails it at its first non-zero byte).
            if len(self.zero_whole) != ext.length:
                self.zero_whole = bytes(ext.length)
            if buf.startswith(self.zero_whole, ext.start):
                out.append(Extent(ext.offset, ext.length))
                return ext.length
        cs, coarse = self.cs, self.coarse
        zc, zcoarse = self.zero_cluster, self.zero_coarse
        base, end = ext.start, ext.start + ext.length
        zeros = 0
        run_start = base
        run_zero: bool | None = None
        pos = base
        while pos < end:
            step = coarse if pos + coarse <= end else cs
            n = min(step, end - pos)
            if n == step:
                is_zero = buf.startswith(zcoarse if step == coarse else zc, pos)
            else:
                is_zero = buf.startswith(zc[:n], pos)
            if step == coarse and not is_zero and coarse != cs:
                # Mixed coarse block: look at its clusters one by one.
                for p in range(pos, pos + coarse, cs):
                    z = buf.startswith(zc, p)
                    if z != run_zero:
                        if run_zero is not None:
                            zeros += self._emit(ext, run_start, p, run_zero, out)
                        run_start, run_zero = p, z
                pos += coarse
                continue
            if is_zero != run_zero:
                if run_zero is not None:
                    zeros += self._emit(ext, run_start, pos, run_zero, out)
                run_start, run_zero = pos, is_zero
            pos += n
        if run_zero is not None:
            zeros += self._emit(ext, run_start, end, run_zero, out)
        return zeros

    @staticmethod
    def _emit(ext: Extent, a: int, b: int, zero: bool, out: list[Extent]) -> int:
        off = ext.offset + (a - ext.start)
        if zero:
            out.append(Extent(off, b - a))
            return b - a
        out.append(Extent(off, b - a, ext.chunk, a))
        return 0


async def zero_skip_stage(
    inq: ClosableQueue[Batch], outq: ClosableQueue[Batch], cluster_size: int, stats: JobStats
) -> None:
    skipper = ZeroSkipper(cluster_size)
    async for batch in inq:
        runs: list[Extent] = []
        for ext in batch.extents:
            if ext.offset % cluster_size:
                raise ValueError("decoder produced an extent that is not cluster aligned")
            stats.zero_bytes_skipped += skipper.split(ext, runs)
        await outq.put(Batch(runs, batch.owned))
    await outq.close()


async def qcow2_encode_stage(
    inq: ClosableQueue[Batch], outq: ClosableQueue[Writes | Finish], settings: Settings, stats: JobStats
) -> None:
    writer = Qcow2Writer(settings.cluster_size, settings.compat, settings.compress)
    if settings.compress != "none":
        guest_end = await _encode_compressed(writer, inq, outq, settings, stats)
    else:
        guest_end = 0
        async for batch in inq:
            items: list[bytes | memoryview | int] = []
            for ext in batch.extents:
                if ext.chunk is not None:
                    writer.add_data(ext.offset, ext.view(), items)  # type: ignore[arg-type]
                else:
                    writer.skip_to(ext.offset + ext.length)
                guest_end = max(guest_end, ext.offset + ext.length)
            stats.data_clusters = writer.data_clusters
            if items:
                await outq.put(Writes(items, batch.owned))
            else:
                batch.release()
    vsize = stats.virtual_size or guest_end
    tail = writer.finish(vsize)
    await outq.put(Writes(list(tail.metadata)))
    stats.virtual_size = tail.virtual_size
    await outq.put(Finish(tail.header, tail.virtual_size, tail.output_size))
    await outq.close()


Compressed = list[tuple[int, bytes, bool]]  # (guest offset, bytes, compressed?) per data cluster


def _compress_runs(
    compress: Callable[[bytes | memoryview], bytes], cs: int, runs: list[Extent]
) -> Compressed:
    """Runs in a worker thread: every data cluster of a batch, compressed where that makes it smaller.

    Plain clusters are copied out, so the batch's chunk goes back to the pool as soon as this returns.
    """
    out: Compressed = []
    for ext in runs:
        view = ext.view()
        for p in range(0, len(view), cs):
            piece: bytes | memoryview = view[p : p + cs]
            if len(piece) < cs:
                piece = bytes(piece) + bytes(cs - len(piece))  # qemu inflates to one whole cluster
            z = compress(piece)
            if len(z) < cs:
                out.append((ext.offset + p, z, True))
            else:
                out.append((ext.offset + p, bytes(piece), False))
    return out


async def _encode_compressed(
    writer: Qcow2Writer,
    inq: ClosableQueue[Batch],
    outq: ClosableQueue[Writes | Finish],
    settings: Settings,
    stats: JobStats,
) -> int:
    """Compress batches on a thread pool, several at once, and place the results in stream order."""
    cs = settings.cluster_size
    compress = make_compressor(settings.compress, settings.level)
    loop = asyncio.get_running_loop()
    pending: deque[tuple[asyncio.Future[Compressed], Batch, int]] = deque()
    # Two batches per thread keep every thread busy while this task places finished ones.
    window = 2 * settings.compress_threads
    guest_end = 0

    async def place() -> None:
        fut, batch, end = pending.popleft()
        try:
            clusters = await fut
        finally:
            batch.release()
        items: list[bytes | memoryview] = []
        for off, data, compressed in clusters:
            if compressed:
                writer.add_compressed(off, data, items)
            else:
                writer.add_data(off, memoryview(data), items)
        writer.skip_to(end)
        stats.data_clusters = writer.data_clusters
        stats.compressed_clusters = writer.compressed_clusters
        if items:
            await outq.put(Writes(list(items)))

    executor = ThreadPoolExecutor(settings.compress_threads, thread_name_prefix="compress")
    try:
        async for batch in inq:
            runs = [ext for ext in batch.extents if ext.chunk is not None]
            end = max((e.offset + e.length for e in batch.extents), default=guest_end)
            guest_end = max(guest_end, end)
            if runs:
                fut = loop.run_in_executor(executor, _compress_runs, compress, cs, runs)
            else:  # all zeros: nothing to compress, but it still takes its turn in stream order
                fut = loop.create_future()
                fut.set_result([])
            pending.append((fut, batch, end))
            if len(pending) >= window:
                await place()
        while pending:
            await place()
    finally:
        # On failure the threads finish the batch in hand and stop; nothing waits for them.
        executor.shutdown(wait=False, cancel_futures=True)
        for _, batch, _ in pending:
            batch.release()
    return guest_end


async def raw_encode_stage(
    inq: ClosableQueue[Batch], outq: ClosableQueue[Writes | Finish], stats: JobStats
) -> None:
    """Raw output: data as is, zero runs as holes (or zeros where the sink cannot make holes)."""
    pos = 0
    async for batch in inq:
        items: list[bytes | memoryview | int] = []
        for ext in batch.extents:
            if ext.offset > pos:
                items.append(ext.offset - pos)
            items.append(ext.view() if ext.chunk is not None else ext.length)
            pos = ext.offset + ext.length
        await outq.put(Writes(items, batch.owned))
    vsize = max(stats.virtual_size, pos)
    if vsize > pos:
        await outq.put(Writes([vsize - pos]))
    stats.virtual_size = vsize
    await outq.put(Finish(b"", vsize, vsize))
    await outq.close()
