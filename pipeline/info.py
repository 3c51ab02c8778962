"""`imgpipe info SRC`: what an image is, without downloading it when the source has ranges.

The same sniffing and decoder checks as a conversion run; a refused image gets its one-line reason
and exit status 3. With ranges only the header and tables are fetched (the summary says how many
bytes); a sequential source is read until the decoder has its header (raw: to the end, to learn the
size of a stream of unknown length).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import ImgpipeError, InputRefused
from pipeline.formats import sniff
from pipeline.formats.layout import Decoder, ImageInfo
from pipeline.formats.probes import HEAD_BYTES
from pipeline.formats.readers import StreamReader
from pipeline.formats.registry import DECODERS
from pipeline.runner import plan_ranged
from pipeline.s3util import S3Context
from pipeline.settings import Settings
from pipeline.sources import open_source
from pipeline.stats import JobStats


async def _allocated(decoder: Decoder) -> int:
    """Guest bytes the tables map to stored data: a walk of the tables, no data read."""
    total = 0
    async for p in decoder.pieces():
        if not p.zero:
            total += p.length
    return total


async def describe(src: str, settings: Settings) -> dict[str, Any]:
    s3 = S3Context(settings)
    source = open_source(src, settings, s3)
    siblings: list[Any] = []
    stats = JobStats(source=src)
    pool = BufferPool(settings.buffers, settings.chunk_size)
    info: ImageInfo
    out: dict[str, Any] = {"source": src}
    try:
        try:
            await source.open()
        except ImgpipeError as exc:
            exc.stage = exc.stage or "source"
            raise
        out["file_size"] = source.size
        plan = await plan_ranged(source, settings, stats, pool, s3, siblings)
        if plan is not None:
            if plan.decoder is not None:
                info = plan.decoder.info
                info.allocated = await _allocated(plan.decoder)
            else:
                info = ImageInfo(plan.match.format, plan.match.detail, source.size or 0, 0, source.size)
        else:
            info = await _describe_stream(source, settings, pool, stats)
    except InputRefused as exc:
        out.update(format=stats.source_format or None, verdict="refused", reason=exc.one_line())
        exc.details = out  # type: ignore[attr-defined]
        raise
    finally:
        out["source_requests"] = source.requests + sum(s.requests for s in siblings)
        out["source_bytes_fetched"] = source.bytes_fetched + sum(s.bytes_fetched for s in siblings)
        for closing in (source, *siblings):
            with contextlib.suppress(Exception):
                await closing.close()
        with contextlib.suppress(Exception):
            await s3.aclose()
    checks = info.details.pop("checks", None)
    out.update(
        format=info.format,
        subformat=info.subformat,
        virtual_size=info.virtual_size,
        allocated_size=info.allocated,
        cluster_size=info.cluster_size or None,
        details=info.details,
        verdict="accepted",
        checks=checks or ["sniffed as one format only", "virtual size within the cap"],
    )
    return out


async def _describe_stream(source: Any, settings: Settings, pool: BufferPool, stats: JobStats) -> ImageInfo:
    q: ClosableQueue[Chunk] = ClosableQueue(settings.queue_depth)
    held: list[Chunk] = []
    producer = asyncio.create_task(source.produce(pool, q, stats.read))
    try:
        head = bytearray()
        while len(head) < HEAD_BYTES:
            chunk = await q.get()
            if chunk is None:
                break
            held.append(chunk)
            head += chunk.view(0, min(chunk.length, HEAD_BYTES - len(head)))
        eof = len(head) < HEAD_BYTES
        size = source.size if source.size is not None else (len(head) if eof else None)
        tail = bytes(head[-512:]) if eof else None
        match = sniff.decide(bytes(head), tail, size)
        stats.source_format = match.format
        if match.format in DECODERS:
            reader = StreamReader(q, source.size, settings.reorder_buffer, held)
            held = []
            try:
                return await DECODERS[match.format](reader, settings).open()
            finally:
                reader.release()
        if size is None:  # a raw stream: its size is its length
            size = sum(c.length for c in held)
            for c in held:
                c.release()
            held = []
            async for chunk in q:
                size += chunk.length
                chunk.release()
        return ImageInfo(match.format, match.detail, size, 0, size)
    finally:
        for c in held:
            c.release()
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer


def human(d: dict[str, Any]) -> str:
    lines = [f"image: {d['source']}"]
    if d.get("verdict") == "refused":
        lines += [f"format: {d.get('format') or 'unknown'}", f"verdict: refused: {d['reason']}"]
        return "\n".join(lines)
    sub = f" ({d['subformat']})" if d.get("subformat") else ""
    lines.append(f"format: {d['format']}{sub}")
    lines.append(f"virtual size: {d['virtual_size']} bytes ({d['virtual_size'] / 2**30:.3g} GiB)")
    if d.get("file_size") is not None:
        lines.append(f"file size: {d['file_size']} bytes")
    if d.get("allocated_size") is not None:
        lines.append(f"allocated: {d['allocated_size']} bytes")
    if d.get("cluster_size"):
        lines.append(f"cluster size: {d['cluster_size']}")
    for k, v in (d.get("details") or {}).items():
        lines.append(f"{k.replace('_', ' ')}: {v}")
    lines.append(f"verdict: accepted ({'; '.join(d['checks'])})")
    lines.append(f"fetched: {d['source_bytes_fetched']} bytes in {d['source_requests']} requests")
    return "\n".join(lines)
