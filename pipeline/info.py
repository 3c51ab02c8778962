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
from pipeline.errors import ImgpipeError, InputRefused, first_error
from pipeline.formats import sniff
from pipeline.formats.layout import Decoder, ImageInfo
from pipeline.formats.probes import HEAD_BYTES, PACKAGES, WRAPPERS
from pipeline.formats.readers import StreamReader
from pipeline.formats.registry import DECODERS, decoder_class
from pipeline.package.ovf import parse_ovf
from pipeline.runner import plan_ranged
from pipeline.s3util import S3Context
from pipeline.settings import Settings
from pipeline.sources import open_source
from pipeline.stages import collect_head
from pipeline.stats import JobStats
from pipeline.unwrap import StreamView, layer_pool, unwrap_stage


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
            info = await _describe_stream(source, settings, pool, stats, out)
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
    if "package" in out:
        out.update(format=info.format, verdict="accepted")
        return out
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


async def _describe_stream(
    source: Any, settings: Settings, pool: BufferPool, stats: JobStats, out: dict[str, Any]
) -> ImageInfo:
    """Read the stream until the format is known (and a package to its end), in one task group with
    the source and unwrap stages, so that their failure ends the reading instead of leaving it waiting."""
    raw_q: ClosableQueue[Chunk] = ClosableQueue(settings.queue_depth)
    q: ClosableQueue[Chunk] = ClosableQueue(settings.queue_depth)
    view = StreamView(source)
    held: list[Chunk] = []

    async def consume(tg: asyncio.TaskGroup) -> ImageInfo:
        nonlocal held
        head = await collect_head(q, held)
        eof = len(head) < HEAD_BYTES
        size = view.size if view.size is not None else (len(head) if eof else None)
        tail = bytes(head[-512:]) if eof else None
        match = view.payload or sniff.decide(head, tail, size)
        stats.source_format = match.format
        if view.wrappers:
            out["wrappers"] = list(view.wrappers)
        if match.format in PACKAGES:
            replay: ClosableQueue[Chunk] = ClosableQueue(settings.queue_depth)
            tg.create_task(_replay(held, q, replay))
            held = []
            out["package"] = await _describe_package(source, match.format, replay, settings)
            return ImageInfo(match.format, match.detail, 0, 0)
        if match.format in DECODERS:
            reader = StreamReader(q, view.size, settings.reorder_buffer, held)
            held = []
            try:
                return await decoder_class(match.format)(reader, settings).open()
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

    try:
        async with asyncio.TaskGroup() as tg:
            stages = [
                tg.create_task(source.produce(pool, raw_q, stats.read)),
                tg.create_task(unwrap_stage(view, raw_q, q, settings, stats)),
            ]
            info = await consume(tg)
            for task in stages:  # the rest of the stream is not needed
                task.cancel()
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        for c in held:
            c.release()
    return info


async def _replay(held: list[Chunk], q: ClosableQueue[Chunk], out: ClosableQueue[Chunk]) -> None:
    for chunk in held:
        await out.put(chunk)
    async for chunk in q:
        await out.put(chunk)
    await out.close()


async def _describe_package(
    source: Any, kind: str, q: ClosableQueue[Chunk], settings: Settings
) -> dict[str, Any]:
    """Every member as it streams by: OVF and manifest parsed, digests checked, each disk sniffed and
    its header read (its virtual size); nothing is written."""
    from pipeline.package.run import Package, PackageContext, Target, check_against_ovf, read_loose_descriptor

    async def member(mq: ClosableQueue[Chunk], target: Target) -> dict[str, Any]:
        fmt, vsize, detail = target.kind, target.size or 0, ""  # a tar member always has its size
        if target.kind == "disk":
            first = await mq.get()
            head = bytes(first.view(0, min(first.length, HEAD_BYTES))) if first is not None else b""
            m = sniff.decide(head, None, None, allow_wrappers=True)
            fmt, detail = m.format, m.detail
            if m.format in DECODERS and first is not None:
                reader = StreamReader(mq, target.size, settings.reorder_buffer, [first])
                first = None
                try:
                    vsize = (await decoder_class(m.format)(reader, settings).open()).virtual_size
                    await reader.drain()
                finally:
                    reader.release()
            if first is not None:
                first.release()
        async for chunk in mq:
            chunk.release()
        if target.kind == "disk" and fmt not in WRAPPERS:  # a compressed member is judged by convert
            check_against_ovf(target, fmt, vsize)
        return {
            "member": target.member,
            "kind": target.kind,
            "disk_id": target.disk_id,
            "index": target.index,
            "size": target.size,
            "format": fmt,
            "detail": detail,
            "virtual_size": vsize if fmt not in WRAPPERS else None,
            "ovf_capacity": target.capacity,
        }

    if kind == "ovf":
        # A loose descriptor: what it says; its disks are objects of their own (give them to info).
        return {"package": "ovf", "ovf": parse_ovf(await read_loose_descriptor(q)).to_json()}
    ctx = PackageContext(
        spec=source.spec,
        dst="{index}",
        output_format=settings.output_format,
        disk_choice=None,
        queue_depth=settings.queue_depth,
        convert=member,
    )
    report = await Package(ctx, layer_pool(settings)).run(q)
    for out in report["outputs"]:
        out.pop("destination", None)
    report["members"] = report.pop("outputs")
    return report


def human(d: dict[str, Any]) -> str:
    lines = [f"image: {d['source']}"]
    if d.get("verdict") == "refused":
        lines += [f"format: {d.get('format') or 'unknown'}", f"verdict: refused: {d['reason']}"]
        return "\n".join(lines)
    if d.get("package"):
        return "\n".join(lines + _human_package(d))
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


def _human_package(d: dict[str, Any]) -> list[str]:
    p = d["package"]
    wrapped = f" in {' in '.join(reversed(d['wrappers']))}" if d.get("wrappers") else ""
    lines = [f"format: {p['package']} package{wrapped}"]
    ovf = p.get("ovf")
    if ovf:
        lines.append(
            f"OVF: name {ovf.get('name')}, OS {ovf.get('os_type')}, {ovf.get('cpus')} CPU, "
            f"{ovf.get('memory_mib')} MiB memory, {len(ovf.get('disks', []))} disk(s)"
        )
    if p["package"] == "ovf" and ovf:
        for disk in ovf.get("disks", []):
            lines.append(
                f"  disk {disk['disk_id']}: {disk['href']}, capacity {disk['capacity']}, {disk['format']}"
            )
    for m in p.get("members", []):
        vs = f", virtual size {m['virtual_size']}" if m.get("virtual_size") is not None else ""
        lines.append(f"  {m['kind']} {m['member']}: {m['format']}{vs}, {m['size']} bytes")
    if p.get("skipped_members"):
        lines.append(f"  skipped: {', '.join(p['skipped_members'])}")
    if "manifest" in p:
        lines.append(f"manifest: {p['manifest']}")
    lines.append("verdict: accepted")
    return lines
