"""Wires one conversion job: source -> [unwrap] -> sniff -> decode -> zero-skip -> encode -> sink.

One task group per job: the first failure cancels every stage, the sink aborts (no partial object,
no open multipart upload, no temporary file) and the error reaches the caller naming its stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pipeline import log
from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import ImgpipeError, SinkError, SourceError, UnsafeImage, UnsupportedImage
from pipeline.formats import sniff
from pipeline.formats.base import Match
from pipeline.formats.decode import decode_stage
from pipeline.formats.layout import Decoder, ImageReader
from pipeline.formats.probes import HEAD_BYTES, TAIL_BYTES, WRAPPERS
from pipeline.formats.readers import RangedReader, StreamReader
from pipeline.formats.registry import DECODERS
from pipeline.messages import Batch, Finish, Writes
from pipeline.qcow2.writer import check_geometry
from pipeline.s3util import S3Context
from pipeline.settings import Settings, TiB
from pipeline.sinks import open_sink
from pipeline.sources import open_source
from pipeline.stages import (
    qcow2_encode_stage,
    raw_decode_stage,
    raw_encode_stage,
    sniff_stage,
    zero_skip_stage,
)
from pipeline.stats import JobStats
from pipeline.unwrap import StreamView, layer_pool, unwrap_stage


@dataclass(frozen=True, slots=True)
class JobHooks:
    """Extension points for a caller that wraps jobs (the queue worker); the CLI passes none.

    on_open(source, sink): after the source is opened and before the sink is: e.g. output metadata
    naming the source's version. on_chunk(view): every source byte, in order, before it moves on.
    on_end(): after the last source byte and before the output can commit; raising there fails the
    job and aborts the output (e.g. a checksum that does not match).
    """

    on_open: Callable[[Any, Any], None] | None = None
    on_chunk: Callable[[memoryview], Awaitable[None]] | None = None
    on_end: Callable[[], None] | None = None


_gc_frozen = False


def output_bound(virtual_size: int, settings: Settings) -> int:
    """Largest output a disk of this size can produce: for S3's part-size policy."""
    if settings.output_format == "raw":
        return virtual_size
    cs = settings.cluster_size
    clusters = -(-virtual_size // cs)
    l2 = -(-clusters // (cs // 8))
    meta = l2 + 8 + -(-(clusters + l2) * 2 // cs) + -(-l2 * 8 // cs)
    if settings.compress != "none":
        meta += l2  # padding to a cluster boundary before each L2 table
    return (clusters + meta + 4) * cs


class _Failures:
    """Remembers the first real failure, in time order, tagged with the stage that raised it."""

    def __init__(self) -> None:
        self.first: BaseException | None = None

    def wrap(self, name: str, coro: Awaitable[None]) -> Coroutine[Any, Any, None]:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except BaseExceptionGroup as group:
                # A stage's own task group (the sinks' uploads): report the error inside, not the group.
                leaf = _first_leaf(group)
                err = leaf if isinstance(leaf, ImgpipeError) else _unexpected(name, leaf)
                err.stage = err.stage or name
                self.first = self.first or err
                raise err from None
            except ImgpipeError as exc:
                exc.stage = exc.stage or name
                self.first = self.first or exc
                raise
            except Exception as exc:
                wrapped = _unexpected(name, exc)
                self.first = self.first or wrapped
                raise wrapped from exc

        return run()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_leaf(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


def _unexpected(stage: str, exc: BaseException) -> ImgpipeError:
    kind: type[ImgpipeError] = (
        SinkError if stage == "sink" else SourceError if stage == "source" else ImgpipeError
    )
    if isinstance(exc, OSError) and exc.strerror:
        err = kind(exc.strerror + (f": {exc.filename}" if exc.filename else ""))
    else:
        err = kind(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    err.stage = stage
    return err


async def time_boxed(
    what: Callable[[], Awaitable[None]],
    seconds: float,
    failure: str = "cleanup failed",
    errors: tuple[type[Exception], ...] = (Exception,),
) -> None:
    """Run cleanup to the end even if we are being cancelled, but never longer than `seconds`.

    A failure of one of `errors` is logged as `failure`, never raised: cleanup must not mask the job's
    own error.
    """
    task = asyncio.ensure_future(what())
    try:
        await asyncio.wait_for(asyncio.shield(task), seconds)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, seconds)
        raise
    except errors as exc:
        log.get(stage="cleanup").warning(failure, error=str(exc))


async def _progress(stats: JobStats, enabled: bool) -> None:
    if not enabled:
        return
    from tqdm import tqdm

    bar = tqdm(
        total=stats.source_size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="converting",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2,
    )
    try:
        while True:
            bar.update(stats.bytes_read - bar.n)
            bar.set_postfix_str(f"zeros skipped {stats.zero_bytes_skipped / 2**20:.0f} MiB", refresh=True)
            await asyncio.sleep(0.25)
    finally:
        bar.update(stats.bytes_read - bar.n)
        bar.close()


async def convert(
    src: str, dst: str, settings: Settings, job_id: str | None = None, hooks: JobHooks | None = None
) -> dict[str, Any]:
    """Convert SRC into DST; return the summary. Raises ImgpipeError subclasses on failure."""
    # botocore and aiohttp leave a large import-time object graph; keep the collector off it. Once per
    # process: freezing again in a long-lived worker would make every earlier job's uncollected cyclic
    # garbage (buffers included) permanent, a leak of tens of MiB per job.
    global _gc_frozen
    if not _gc_frozen:
        gc.freeze()
        _gc_frozen = True
    stats = JobStats(source=src, destination=dst, output_format=settings.output_format)
    stats.cluster_size = settings.cluster_size if settings.output_format == "qcow2" else 0
    stats.compression = settings.compress
    logger = log.get(job=job_id, source=src, destination=dst)
    s3 = S3Context(settings)
    source = open_source(src, settings, s3)  # one S3 client per job serves both ends
    sink = None
    siblings: list[Any] = []
    pool = BufferPool(settings.buffers, settings.chunk_size)
    try:
        await _open_source(source)
        stats.source_size = source.size
        if source.size is not None and source.size > settings.max_virtual_size:
            raise UnsafeImage(
                f"source is {source.size} bytes, over the virtual-size cap of "
                f"{settings.max_virtual_size / TiB:g} TiB; raise IMGPIPE_MAX_VIRTUAL_SIZE if expected"
            )
        plan: Plan | None = None
        if hooks is None or hooks.on_chunk is None:
            # A hook that must see every source byte in order keeps the job on the stream path.
            plan = await plan_ranged(source, settings, stats, pool, s3, siblings)
        vsize = plan.decoder.info.virtual_size if plan and plan.decoder else source.size
        bound: int | None = None
        if vsize is not None:
            if settings.output_format == "qcow2":
                check_geometry(vsize, settings.cluster_size)
            if plan is not None:  # a sequential source's content may be a sparse image of any size
                bound = output_bound(vsize, settings)
        sink = open_sink(dst, settings, s3, bound)
        if hooks is not None and hooks.on_open is not None:
            hooks.on_open(source, sink)
        reserve = settings.cluster_size if settings.output_format == "qcow2" else 0
        await sink.open(reserve)
        logger.info("job started", size=source.size, ranged=source.ranged, etag=source.etag)
        await _run_stages(source, sink, settings, stats, pool, s3, plan, hooks)
    except BaseException as exc:
        if sink is not None:
            await time_boxed(sink.abort, settings.cleanup_timeout)
        if isinstance(exc, ImgpipeError):
            logger.info("job failed", stage=exc.stage, error=exc.one_line(), exit_status=exc.exit_status)
        raise
    finally:
        stats.requests = source.requests + sum(s.requests for s in siblings)
        stats.bytes_fetched = source.bytes_fetched + sum(s.bytes_fetched for s in siblings)
        for closing in (source, *siblings):
            with contextlib.suppress(Exception):
                await closing.close()
        with contextlib.suppress(Exception):
            await s3.aclose()
    stats.seconds = time.monotonic() - stats.started
    stats.output_size = sink.written
    summary = stats.summary()
    logger.info("job done", **{k: v for k, v in summary.items() if k not in ("source", "destination")})
    return summary


@dataclass(slots=True)
class Plan:
    """What a ranged source's head and tail said, decided before the sink is opened."""

    match: Match
    tail: bytes | None
    decoder: Decoder | None  # None: raw or ISO, read by the stream path


def _sibling_opener(
    source: Any, settings: Settings, s3: S3Context, siblings: list[Any], stats: JobStats
) -> Callable[[str], Awaitable[ImageReader]] | None:
    """Extents of a VMDK descriptor: objects beside the source's own, opened with the same client."""
    spec: str = source.spec
    if not spec.startswith(("s3://", "http://", "https://")):
        return None
    base = spec.split("?", 1)[0].rsplit("/", 1)[0]

    async def open_sibling(name: str) -> ImageReader:
        sib = open_source(f"{base}/{name}", settings, s3)
        siblings.append(sib)
        await _open_source(sib)
        if not sib.ranged or sib.size is None:
            raise UnsafeImage(f"{base}/{name}: an extent must be readable with byte ranges")
        return RangedReader(sib, on_bytes=stats.read)

    return open_sibling


async def plan_ranged(
    source: Any, settings: Settings, stats: JobStats, pool: BufferPool, s3: S3Context, siblings: list[Any]
) -> Plan | None:
    """With ranges: sniff from the head and tail, and open a sparse format's decoder (its header and
    first tables are ranged reads; the data is never streamed past)."""
    size = source.size
    if not source.ranged or not size:
        return None
    try:
        prefix = await source.peek_head(pool)
        n = min(HEAD_BYTES, size)
        head = prefix[:n] if len(prefix) >= n else await source.read_range(0, n)
        tail = (
            bytes(head[-TAIL_BYTES:]) if size <= n else await source.read_range(size - TAIL_BYTES, TAIL_BYTES)
        )
    except ImgpipeError as exc:
        exc.stage = exc.stage or "source"
        raise
    try:
        match = sniff.decide(head, tail, size, allow_wrappers=True)
    except ImgpipeError as exc:
        exc.stage = exc.stage or "sniff"
        raise
    if match.format in WRAPPERS:
        # Compressed: the content is sequential-only; the stream path peels it (the unwrap stage).
        return None
    stats.source_format, stats.source_detail = match.format, match.detail
    if match.format not in DECODERS:
        return Plan(match, tail, None)
    reader = RangedReader(
        source, prefix or head, stats.read, _sibling_opener(source, settings, s3, siblings, stats)
    )
    decoder = DECODERS[match.format](reader, settings)
    try:
        await decoder.open()
    except ImgpipeError as exc:
        exc.stage = exc.stage or "decode"
        raise
    return Plan(match, tail, decoder)


async def _open_source(source: Any) -> None:
    try:
        await source.open()
    except ImgpipeError as exc:
        exc.stage = exc.stage or "source"
        raise


async def _tap_stage(inq: ClosableQueue[Chunk], outq: ClosableQueue[Chunk], hooks: JobHooks) -> None:
    """Show every source chunk to the caller's hook, in order, then pass it on unchanged."""
    async for chunk in inq:
        if hooks.on_chunk is not None:
            await hooks.on_chunk(chunk.view())
        await outq.put(chunk)
    if hooks.on_end is not None:
        hooks.on_end()
    await outq.close()


async def _stream_decode(
    match: Match,
    inq: ClosableQueue[Chunk],
    outq: ClosableQueue[Batch],
    pool: BufferPool,
    source: Any,
    settings: Settings,
    stats: JobStats,
) -> None:
    """A sparse format from a sequential source: decode in one pass through the stream reader."""
    if source.wrappers:
        # The source side of the job's pool may be all held by compressed chunks waiting for the
        # unwrap stage, which waits for this decoder: its output comes from a pool of its own.
        pool = layer_pool(settings)
    reader = StreamReader(inq, source.size, settings.reorder_buffer)
    try:
        decoder = DECODERS[match.format](reader, settings)
        info = await decoder.open()
        if settings.output_format == "qcow2":
            check_geometry(info.virtual_size, settings.cluster_size)

        async def at_end() -> None:
            decoder.check_end(await reader.drain())

        await decode_stage(decoder, pool, outq, 1, stats, at_end)
    finally:
        reader.release()


async def _run_stages(
    source: Any,
    sink: Any,
    settings: Settings,
    stats: JobStats,
    pool: BufferPool,
    s3: S3Context,
    plan: Plan | None = None,
    hooks: JobHooks | None = None,
) -> None:
    depth = settings.queue_depth
    raw_q: ClosableQueue[Chunk] = ClosableQueue(depth)
    sniffed_q: ClosableQueue[Chunk] = ClosableQueue(depth)
    decoded_q: ClosableQueue[Batch] = ClosableQueue(depth)
    runs_q: ClosableQueue[Batch] = ClosableQueue(depth)
    out_q: ClosableQueue[Writes | Finish] = ClosableQueue(depth)
    verdict: asyncio.Future[Match] = asyncio.get_running_loop().create_future()
    failures = _Failures()
    progress_on = settings.progress if settings.progress is not None else sys.stderr.isatty()

    view = StreamView(source)  # what sniff and decode see: a sequential stream once unwrapped

    async def decode() -> None:
        match = await verdict
        if match.format in DECODERS:
            await _stream_decode(match, sniffed_q, decoded_q, pool, view, settings, stats)
        elif match.format in ("raw", "iso"):
            await raw_decode_stage(sniffed_q, decoded_q, settings, stats)
        else:
            raise UnsupportedImage(f"no decoder for {match.format}")  # sniff refuses these first

    if settings.output_format == "qcow2":
        encode = qcow2_encode_stage(runs_q, out_q, settings, stats)
    else:
        encode = raw_encode_stage(runs_q, out_q, stats)
    try:
        async with asyncio.TaskGroup() as tg:
            progress = asyncio.create_task(_progress(stats, progress_on))
            if plan is not None and plan.decoder is not None:
                # Ranged sparse image: the decoder reads what it needs; nothing streams the whole file.
                tg.create_task(
                    failures.wrap(
                        "decode",
                        decode_stage(plan.decoder, pool, decoded_q, settings.read_concurrency, stats),
                    )
                )
            elif hooks is not None:
                tapped_q: ClosableQueue[Chunk] = ClosableQueue(depth)
                tg.create_task(failures.wrap("source", source.produce(pool, tapped_q, stats.read)))
                tg.create_task(failures.wrap("verify", _tap_stage(tapped_q, raw_q, hooks)))
            else:
                tg.create_task(failures.wrap("source", source.produce(pool, raw_q, stats.read)))
            if plan is None or plan.decoder is None:
                known = plan.tail if plan is not None else None
                sniff_in = raw_q
                if plan is None:
                    # Not sniffed yet: maybe compressed. A ranged plan already knows it is not.
                    sniff_in = ClosableQueue(depth)
                    tg.create_task(
                        failures.wrap("unwrap", unwrap_stage(view, raw_q, sniff_in, settings, stats))
                    )
                tg.create_task(
                    failures.wrap("sniff", sniff_stage(view, sniff_in, sniffed_q, verdict, stats, known))
                )
                tg.create_task(failures.wrap("decode", decode()))
            tg.create_task(
                failures.wrap("zero-skip", zero_skip_stage(decoded_q, runs_q, settings.cluster_size, stats))
            )
            tg.create_task(failures.wrap("encode", encode))
            tg.create_task(failures.wrap("sink", sink.run(out_q)))
    except BaseExceptionGroup as group:
        if failures.first is not None:
            raise failures.first from None
        raise group.exceptions[0] from None
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress
