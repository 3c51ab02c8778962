"""Wires one conversion job: source -> [unwrap] -> sniff -> decode -> zero-skip -> encode -> sink.

One task group per job: the first failure cancels every stage, the sink aborts (no partial object,
no open multipart upload, no temporary file) and the error reaches the caller naming its stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import log
from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import (
    ImgpipeError,
    SinkError,
    SourceError,
    UnsafeImage,
    UnsupportedImage,
    UsageError,
    first_error,
    is_missing,
)
from pipeline.formats import sniff
from pipeline.formats.base import Match
from pipeline.formats.probes import COPIED, HEAD_BYTES, PACKAGES, TAIL_BYTES, WRAPPERS
from pipeline.formats.registry import DECODERS, decoder_class
from pipeline.messages import Batch, Extent, Finish, Writes
from pipeline.qcow2.writer import check_geometry
from pipeline.s3util import S3Context
from pipeline.settings import Settings, TiB
from pipeline.sinks import open_sink
from pipeline.sinks.base import Sink
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

if TYPE_CHECKING:
    # Imported where a job meets what needs them: the sparse-format machinery (readers, the decode
    # stage; the decoders themselves come from the registry) for qcow2, VMDK, VHD(X) and VDI inputs,
    # pipeline.package (tar, OVF, manifest, the XML parser) for packages. A raw job loads neither.
    from pipeline.formats.layout import Decoder, ImageReader
    from pipeline.package.run import PackageContext


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
                leaf = first_error(group)
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


class Outputs:
    """Every sink of a job, opened when the stages know what they write: one for an image, one per
    disk, kernel and ramdisk for a package (those commit together at its end). Aborting aborts all."""

    def __init__(
        self, dst: str, settings: Settings, s3: S3Context, source: Any, hooks: JobHooks | None
    ) -> None:
        self.dst = dst
        self.settings = settings
        self.s3 = s3
        self.source = source
        self.hooks = hooks
        self.sinks: list[Sink] = []
        if not dst.endswith("/") and "{" not in dst:  # a prefix or a template: a package's outputs
            open_sink(dst, settings, s3, None)  # a DST that cannot work is a usage error before any read

    async def open(
        self, spec: str, bound: int | None, reserve: int, deferred: bool = False, kind: str | None = None
    ) -> Sink:
        sink = open_sink(spec, self.settings, self.s3, bound)
        if deferred and not sink.can_defer:
            raise UsageError(f"{spec}: a package's outputs must be files or S3 objects, not a pipe")
        sink.deferred = deferred
        if spec == self.dst and self.hooks is not None and self.hooks.on_open is not None:
            self.hooks.on_open(self.source, sink)
        if kind is not None and isinstance(getattr(sink, "create_args", None), dict):
            meta = dict(sink.create_args.get("Metadata", {}))  # type: ignore[attr-defined]
            meta["imgpipe-kind"] = kind
            sink.create_args["Metadata"] = meta  # type: ignore[attr-defined]
        self.sinks.append(sink)
        await sink.open(reserve)
        return sink

    async def commit_deferred(self) -> None:
        for sink in self.sinks:
            if sink.deferred and not sink.committed:
                await sink.commit()

    async def abort(self) -> None:
        for sink in reversed(self.sinks):
            await time_boxed(sink.abort, self.settings.cleanup_timeout)

    @property
    def written(self) -> int:
        return sum(s.written for s in self.sinks)


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
    outputs: Outputs | None = None
    siblings: list[Any] = []
    pool = BufferPool(settings.buffers, settings.chunk_size)
    package: dict[str, Any] = {}
    try:
        outputs = Outputs(dst, settings, s3, source, hooks)
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
        main: Sink | None = None
        if plan is not None:
            vsize = plan.decoder.info.virtual_size if plan.decoder else source.size
            assert vsize is not None
            if settings.output_format == "qcow2":
                check_geometry(vsize, settings.cluster_size)
            main = await outputs.open(dst, output_bound(vsize, settings), _reserve(settings))
        logger.info("job started", size=source.size, ranged=source.ranged, etag=source.etag)
        await _run_stages(source, outputs, main, settings, stats, pool, s3, plan, hooks, package, siblings)
        await outputs.commit_deferred()
    except BaseException as exc:
        if outputs is not None:
            await outputs.abort()
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
    stats.output_size = outputs.written
    summary = stats.summary()
    if package:
        written = {s.spec: s.written for s in outputs.sinks}
        for out in package.get("outputs", []):
            out["output_size"] = written.get(out["destination"], 0)
        summary.update(package)
    logger.info("job done", **{k: v for k, v in summary.items() if k not in ("source", "destination")})
    return summary


def _reserve(settings: Settings) -> int:
    return settings.cluster_size if settings.output_format == "qcow2" else 0


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

    async def open_sibling(name: str) -> ImageReader:
        from pipeline.formats.readers import RangedReader

        where = _sibling_spec(spec, name)
        sib = open_source(where, settings, s3)
        siblings.append(sib)
        await _open_source(sib)
        if not sib.ranged or sib.size is None:
            raise UnsafeImage(f"{where}: an extent must be readable with byte ranges")
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
    if match.format in WRAPPERS or match.format in PACKAGES or match.format in COPIED:
        # Compressed: the content is sequential-only; the stream path peels it (the unwrap stage).
        # An archive is read as a stream too; a kernel or ramdisk is copied as one.
        return None
    stats.source_format, stats.source_detail = match.format, match.detail
    if match.format not in DECODERS:
        return Plan(match, tail, None)
    from pipeline.formats.readers import RangedReader

    reader = RangedReader(
        source, prefix or head, stats.read, _sibling_opener(source, settings, s3, siblings, stats)
    )
    decoder = decoder_class(match.format)(reader, settings)
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
    source: Any,
    settings: Settings,
    stats: JobStats,
) -> None:
    """A sparse format from a sequential source: decode in one pass through the stream reader."""
    from pipeline.formats.decode import decode_stage
    from pipeline.formats.readers import StreamReader

    # The source side of the job's pool may be all held by chunks queued on the way to this decoder
    # (source -> unwrap -> sniff -> here: more chunks than the pool has), which waits for them: its
    # output comes from a pool of its own. A 1 GiB streamOptimized VMDK over HTTP deadlocked without.
    pool = layer_pool(settings)
    reader = StreamReader(inq, source.size, settings.reorder_buffer)
    try:
        decoder = decoder_class(match.format)(reader, settings)
        info = await decoder.open()
        if settings.output_format == "qcow2":
            check_geometry(info.virtual_size, settings.cluster_size)

        async def at_end() -> None:
            decoder.check_end(await reader.drain())

        await decode_stage(decoder, pool, outq, 1, stats, at_end)
    finally:
        reader.release()


class _MemberSource:
    """What a package member looks like to the stages after the package stage: sequential, sized."""

    ranged = False
    etag = None

    def __init__(self, spec: str, size: int | None) -> None:
        self.spec = spec
        self.size: int | None = size

    async def read_range(self, offset: int, length: int) -> bytes:
        raise AssertionError("a package member is read in one pass")


async def _copy_stage(inq: ClosableQueue[Chunk], outq: ClosableQueue[Batch], stats: JobStats) -> None:
    """A kernel or ramdisk: copied byte for byte (no zero skipping, no footer trimming)."""
    offset = 0
    async for chunk in inq:
        await outq.put(Batch([Extent(offset, chunk.length, chunk, chunk.base)], [chunk]))
        offset += chunk.length
    stats.virtual_size = offset
    await outq.close()


def _raise_first(group: BaseExceptionGroup[BaseException], failures: _Failures) -> None:
    if failures.first is not None:
        raise failures.first from None
    raise group.exceptions[0] from None


async def _image_stages(
    inq: ClosableQueue[Chunk],
    view: StreamView,
    open_output: Callable[[str | None], Awaitable[Sink]],
    settings: Settings,
    stats: JobStats,
    pool: BufferPool,
    failures: _Failures,
    *,
    unwrap: bool = True,
    known_tail: bytes | None = None,
    forced: str | None = None,
    package: Callable[[ClosableQueue[Chunk]], Awaitable[None]] | None = None,
    loose_ovf: Callable[[ClosableQueue[Chunk]], Awaitable[None]] | None = None,
) -> None:
    """A sequential image's chunks -> [unwrap] -> sniff -> decode -> zero-skip -> encode -> sink.

    The sink is opened once the format is known: an archive opens one per member (the package
    stage), a kernel or ramdisk is copied as raw. `forced` skips sniffing (a package's kernel).
    """
    depth = settings.queue_depth
    sniffed_q: ClosableQueue[Chunk] = ClosableQueue(depth)
    decoded_q: ClosableQueue[Batch] = ClosableQueue(depth)
    out_q: ClosableQueue[Writes | Finish] = ClosableQueue(depth)
    verdict: asyncio.Future[Match] = asyncio.get_running_loop().create_future()

    async def back(tg: asyncio.TaskGroup) -> None:
        match = await verdict
        if match.format == "tar":
            if package is None:
                raise UnsupportedImage("a tar archive inside a package is not unpacked")
            stats.source_format, stats.source_detail = "tar", match.detail
            await package(sniffed_q)
            return
        if match.format == "ovf":
            if loose_ovf is None:
                raise UnsupportedImage(
                    "an OVF descriptor inside a package is read by the package, not as a disk"
                )
            stats.source_format, stats.source_detail = "ovf", match.detail
            await loose_ovf(sniffed_q)
            return
        if match.format in COPIED:
            stats.output_format = "raw"
            sink = await open_output(match.format)
            tg.create_task(failures.wrap("copy", _copy_stage(sniffed_q, decoded_q, stats)))
            tg.create_task(failures.wrap("encode", raw_encode_stage(decoded_q, out_q, stats)))
            tg.create_task(failures.wrap("sink", sink.run(out_q)))
            return
        _output_stages(tg, failures, decoded_q, await open_output(None), settings, stats)
        if match.format in DECODERS:
            await _stream_decode(match, sniffed_q, decoded_q, view, settings, stats)
        elif match.format in ("raw", "iso"):
            await raw_decode_stage(sniffed_q, decoded_q, settings, stats)
        else:
            raise UnsupportedImage(f"no decoder for {match.format}")  # sniff refuses these first

    try:
        async with asyncio.TaskGroup() as tg:
            q = inq
            if forced is not None:
                stats.source_format = forced
                verdict.set_result(Match(forced))
                tg.create_task(failures.wrap("copy", _pass(q, sniffed_q)))
            else:
                if unwrap:
                    q = ClosableQueue(depth)
                    tg.create_task(failures.wrap("unwrap", unwrap_stage(view, inq, q, settings, stats)))
                tg.create_task(
                    failures.wrap("sniff", sniff_stage(view, q, sniffed_q, verdict, stats, known_tail))
                )
            tg.create_task(failures.wrap("decode", back(tg)))
    except BaseExceptionGroup as group:
        _raise_first(group, failures)


def _output_stages(
    tg: asyncio.TaskGroup,
    failures: _Failures,
    decoded_q: ClosableQueue[Batch],
    sink: Sink,
    settings: Settings,
    stats: JobStats,
) -> None:
    """Guest extents -> zero-skip -> qcow2 (or raw) encode -> sink, as tasks of the job's group."""
    depth = settings.queue_depth
    runs_q: ClosableQueue[Batch] = ClosableQueue(depth)
    out_q: ClosableQueue[Writes | Finish] = ClosableQueue(depth)
    if settings.output_format == "qcow2":
        encode = qcow2_encode_stage(runs_q, out_q, settings, stats)
    else:
        encode = raw_encode_stage(runs_q, out_q, stats)
    tg.create_task(
        failures.wrap("zero-skip", zero_skip_stage(decoded_q, runs_q, settings.cluster_size, stats))
    )
    tg.create_task(failures.wrap("encode", encode))
    tg.create_task(failures.wrap("sink", sink.run(out_q)))


async def _pass(inq: ClosableQueue[Chunk], outq: ClosableQueue[Chunk]) -> None:
    async for chunk in inq:
        await outq.put(chunk)
    await outq.close()


async def _run_stages(
    source: Any,
    outputs: Outputs,
    main: Sink | None,
    settings: Settings,
    stats: JobStats,
    pool: BufferPool,
    s3: S3Context,
    plan: Plan | None = None,
    hooks: JobHooks | None = None,
    package: dict[str, Any] | None = None,
    siblings: list[Any] | None = None,
) -> None:
    depth = settings.queue_depth
    raw_q: ClosableQueue[Chunk] = ClosableQueue(depth)
    failures = _Failures()
    progress_on = settings.progress if settings.progress is not None else sys.stderr.isatty()
    view = StreamView(source)  # what sniff and decode see: a sequential stream once unwrapped

    async def open_main(kind: str | None) -> Sink:
        if main is not None:
            return main
        if kind is not None:
            return await outputs.open(outputs.dst, None, 0, kind=kind)
        if settings.output_format == "qcow2" and stats.virtual_size:
            check_geometry(stats.virtual_size, settings.cluster_size)
        return await outputs.open(outputs.dst, None, _reserve(settings))

    def package_context() -> PackageContext:
        from pipeline.package.run import PackageContext

        return PackageContext(
            spec=source.spec,
            dst=outputs.dst,
            output_format=settings.output_format,
            disk_choice=settings.disk,
            queue_depth=depth,
            convert=functools.partial(_convert_member, outputs=outputs, settings=settings, parent=stats),
        )

    async def run_package(inq: ClosableQueue[Chunk]) -> None:
        from pipeline.package.run import package_stage

        ctx = package_context()
        try:
            await package_stage(inq, ctx, layer_pool(settings))
        except ImgpipeError as exc:
            exc.stage = exc.stage or "package"
            raise
        if package is not None:
            package.update(ctx.report)

    async def run_loose_ovf(inq: ClosableQueue[Chunk]) -> None:
        ctx = package_context()
        try:
            report = await _loose_ovf(inq, ctx, source, settings, s3, pool, stats, siblings)
        except ImgpipeError as exc:
            exc.stage = exc.stage or "package"
            raise
        if package is not None:
            package.update(report)

    try:
        async with asyncio.TaskGroup() as tg:
            progress = asyncio.create_task(_progress(stats, progress_on))
            if plan is not None and plan.decoder is None and main is not None:
                from pipeline import localcopy

                if localcopy.eligible(source, main, plan.match.format, settings):
                    # A local raw file into a local file: no stage has anything to add (localcopy.py).
                    tg.create_task(failures.wrap("copy", localcopy.local_copy(source, main, settings, stats)))
                    return
            if plan is not None and plan.decoder is not None:
                # Ranged sparse image: the decoder reads what it needs; nothing streams the whole file.
                from pipeline.formats.decode import decode_stage

                assert main is not None
                decoded_q: ClosableQueue[Batch] = ClosableQueue(depth)
                tg.create_task(
                    failures.wrap(
                        "decode",
                        decode_stage(plan.decoder, pool, decoded_q, settings.read_concurrency, stats),
                    )
                )
                _output_stages(tg, failures, decoded_q, main, settings, stats)
                return
            if hooks is not None:
                tapped_q: ClosableQueue[Chunk] = ClosableQueue(depth)
                tg.create_task(failures.wrap("source", source.produce(pool, tapped_q, stats.read)))
                tg.create_task(failures.wrap("verify", _tap_stage(tapped_q, raw_q, hooks)))
            else:
                tg.create_task(failures.wrap("source", source.produce(pool, raw_q, stats.read)))
            tg.create_task(
                _image_stages(
                    raw_q,
                    view,
                    open_main,
                    settings,
                    stats,
                    pool,
                    failures,
                    # A ranged plan already sniffed: not compressed, and its tail is known.
                    unwrap=plan is None,
                    known_tail=plan.tail if plan is not None else None,
                    package=run_package,
                    loose_ovf=run_loose_ovf,
                )
            )
    except BaseExceptionGroup as group:
        _raise_first(group, failures)
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress


async def _convert_member(
    inq: ClosableQueue[Chunk], target: Any, *, outputs: Outputs, settings: Settings, parent: JobStats
) -> dict[str, Any]:
    """One disk, kernel or ramdisk of a package, from its chunks to its own (deferred) output."""
    from pipeline.package.run import check_against_ovf

    stats = JobStats(source=f"{parent.source}#{target.member}", destination=target.spec)
    stats.output_format = settings.output_format
    stats.cluster_size = settings.cluster_size if settings.output_format == "qcow2" else 0
    stats.compression = settings.compress
    sinks: list[Sink] = []

    async def open_output(kind: str | None) -> Sink:
        if target.kind != "disk" and kind is None:
            raise UnsupportedImage(
                f"package member {target.member} is named like a {target.kind} but is a disk image"
            )
        if target.kind == "disk" and kind is not None:
            raise UnsupportedImage(f"package member {target.member} is a {kind}, not a disk image")
        reserve = 0 if kind is not None else _reserve(settings)
        sink = await outputs.open(target.spec, None, reserve, deferred=True, kind=target.kind)
        sinks.append(sink)
        return sink

    view = StreamView(_MemberSource(stats.source, target.size))
    forced = target.kind if target.kind != "disk" else None
    try:
        await _image_stages(
            inq, view, open_output, settings, stats, layer_pool(settings), _Failures(), forced=forced
        )
    except ImgpipeError as exc:
        # Say which member: "disk2.vmdk: decode: vmdk: ..."
        exc.stage = f"{target.member}: {exc.stage}" if exc.stage else target.member
        raise
    vsize = stats.virtual_size
    check_against_ovf(target, stats.source_format, vsize)
    return {
        "destination": target.spec,
        "kind": target.kind,
        "member": target.member,
        "disk_id": target.disk_id,
        "index": target.index,
        "source_format": stats.source_format,
        "source_detail": stats.source_detail,
        "source_wrappers": stats.source_wrappers,
        "output_format": stats.output_format,
        "virtual_size": vsize,
        "output_size": sinks[0].written if sinks else 0,
        "data_clusters": stats.data_clusters,
        "zero_bytes_skipped": stats.zero_bytes_skipped,
    }


def _sibling_spec(spec: str, name: str) -> str:
    """An object beside SRC: same bucket and prefix, same URL directory, or same local directory."""
    if spec.startswith(("s3://", "http://", "https://")):
        return f"{spec.split('?', 1)[0].rsplit('/', 1)[0]}/{name}"
    return os.path.join(os.path.dirname(os.path.abspath(spec)), name)


async def _loose_ovf(
    inq: ClosableQueue[Chunk],
    ctx: PackageContext,
    source: Any,
    settings: Settings,
    s3: S3Context,
    pool: BufferPool,
    stats: JobStats,
    siblings: list[Any] | None,
) -> dict[str, Any]:
    """SRC is an OVF descriptor: its manifest (NAME.mf, if there is one) and its disks are the objects
    beside it, each streamed once through the same checks as an OVA's members."""
    from pipeline.package.run import Package, chunk_views, read_loose_descriptor

    data = await read_loose_descriptor(inq)
    pkg = Package(ctx, layer_pool(settings))
    name = os.path.basename(source.spec.split("?", 1)[0])
    pkg.hash_bytes(name, data)
    stem = name.rsplit(".", 1)[0]

    async def read(href: str, optional: bool) -> Any:
        if source.spec.startswith(("s3://", "http://", "https://")) and any(c in href for c in "%?#\\"):
            # A URL would decode or cut these (%2e%2e is "..") and reach outside the descriptor's folder.
            raise UnsafeImage(f"OVF href {href[:200]!r} holds a character that changes a URL (% ? # \\)")
        sib = open_source(_sibling_spec(source.spec, href), settings, s3)
        if siblings is not None:
            siblings.append(sib)
        try:
            await sib.open()
        except ImgpipeError as exc:
            if optional and is_missing(exc):
                return None
            exc.stage = exc.stage or "source"
            raise
        return sib

    mf = await read(f"{stem}.mf", optional=True)
    if mf is not None:
        body = await _read_whole(mf, pool, stats, 1 << 20)
        pkg.manifest_member(f"{stem}.mf", body)
    await pkg.descriptor_member(name, data)
    for href in list(pkg.ova_disks):
        sib = await read(href, optional=False)
        q: ClosableQueue[Chunk] = ClosableQueue(settings.queue_depth)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sib.produce(pool, q, stats.read))
            await pkg.content_member(href, sib.size, chunk_views(q))
    await pkg.finish()
    return pkg.report()


async def _read_whole(src: Any, pool: BufferPool, stats: JobStats, limit: int) -> bytes:
    from pipeline.package.run import chunk_views

    if src.size is not None and src.size > limit:
        raise UnsafeImage(f"{src.spec} is {src.size} bytes, more than the {limit >> 20} MiB allowed")
    q: ClosableQueue[Chunk] = ClosableQueue(2)
    out = bytearray()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(src.produce(pool, q, stats.read))
        async for view in chunk_views(q):
            out += view
            if len(out) > limit:
                raise UnsafeImage(f"{src.spec} is more than the {limit >> 20} MiB allowed")
    return bytes(out)
