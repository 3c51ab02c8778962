"""Local raw image -> local file: the whole data path on worker threads.

The stage pipeline hands every chunk through five queues and, for a file, two thread round trips. A
raw image from a local file needs none of that: its bytes need no decoding, and reading, zero testing
and writing are each one call. Measured on the benchmark's 4 GiB disk, the hand-offs cost more than
the work: 0.9 s through the stages, 0.4 s for two threads that each read a chunk, test it for zeros
and write its data. So here each of `threads` workers takes every `threads`-th chunk through exactly
that. The one step taken in stream order, under a lock, is the encoder's bookkeeping (Qcow2Writer, the
same layout as the encode stage's), which says where a chunk's data goes; reads and writes overlap.

Only for what needs nothing else: a ranged local file sniffed as raw or ISO, an uncompressed qcow2 or
raw output to a local file, no hook that watches the bytes. Everything else takes the stages.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.buffers import Chunk, aligned_buffer
from pipeline.errors import SinkError, SourceError
from pipeline.messages import Extent, Finish
from pipeline.qcow2.writer import Qcow2Writer
from pipeline.settings import Settings
from pipeline.sinks.file import Extents, FileSink, place, pwritev_all
from pipeline.sources.file import FileSource, pread_full
from pipeline.stages import ZeroSkipper
from pipeline.stats import JobStats
from pipeline.threads import to_thread_to_end, wait_out

THREADS = 2  # one per core here; a third only queues behind the same two copies (measured)


def eligible(source: Any, sink: Any, format_: str, settings: Settings) -> bool:
    """Whether this job can take the threaded path."""
    return (
        type(source) is FileSource
        and source.ranged
        and bool(source.size)
        and type(sink) is FileSink
        and not sink.deferred
        and format_ in ("raw", "iso")
        and settings.compress == "none"
        and settings.output_format in ("qcow2", "raw")
    )


def _failed(kind: type[SourceError] | type[SinkError], message: str) -> SourceError | SinkError:
    err = kind(message)
    err.stage = "source" if kind is SourceError else "sink"
    return err


class _Stopped(Exception):
    """Another worker failed or the job was cancelled: this one leaves at its next turn."""


class _Copy:
    def __init__(self, source: FileSource, sink: FileSink, settings: Settings, stats: JobStats) -> None:
        assert source.size is not None
        self.source, self.sink, self.stats = source, sink, stats
        self.size = source.size
        self.chunk_size = settings.chunk_size
        self.cluster_size = settings.cluster_size
        qcow2 = settings.output_format == "qcow2"
        self.writer = Qcow2Writer(settings.cluster_size, settings.compat) if qcow2 else None
        self.pos = sink.reserve  # the output's running length (qcow2); raw writes at guest offsets
        self.turn = 0  # the chunk whose bookkeeping is next
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.src_fd = source.fileno()
        self.dst_fd = sink.fd

    def worker(self, first: int, step: int) -> None:
        buf, base = aligned_buffer(self.chunk_size)
        skipper = ZeroSkipper(self.cluster_size)
        chunks = -(-self.size // self.chunk_size)
        for index in range(first, chunks, step):
            if self.stop.is_set():
                raise _Stopped
            offset = index * self.chunk_size
            want = min(self.chunk_size, self.size - offset)
            try:
                got = pread_full(self.src_fd, memoryview(buf)[base : base + want], offset)
            except OSError as exc:
                why = exc.strerror or exc
                raise _failed(SourceError, f"{self.source.spec}: read failed: {why}") from None
            if got < want:
                raise _failed(
                    SourceError,
                    f"{self.source.spec}: the file ended at {offset + got} bytes, not {self.size}; "
                    "it changed while read",
                )
            runs: list[Extent] = []
            zeros = skipper.split(Extent(offset, got, Chunk(None, buf, got, base), base), runs)
            writes = self._place(index, runs, zeros, got)
            try:
                for at, pieces in writes:
                    pwritev_all(self.dst_fd, pieces, at)
            except OSError as exc:
                raise _failed(SinkError, f"{self.sink.spec}: write failed: {exc.strerror or exc}") from None

    def _place(self, index: int, runs: list[Extent], zeros: int, got: int) -> Extents:
        """In stream order: where this chunk's data goes, as positional writes."""
        with self.cond:
            while self.turn != index:
                if self.stop.is_set():
                    raise _Stopped
                self.cond.wait()
            writes: Extents = []
            if self.writer is None:
                # Raw: each data run at its guest offset; zero runs stay holes.
                writes = [(run.offset, [run.view()]) for run in runs if run.chunk is not None]
            else:
                items: list[bytes | memoryview | int] = []
                for run in runs:
                    if run.chunk is not None:
                        self.writer.add_data(run.offset, run.view(), items)  # type: ignore[arg-type]
                    else:
                        self.writer.skip_to(run.offset + run.length)
                writes, self.pos = place(items, self.pos)
                self.stats.data_clusters = self.writer.data_clusters
            self.stats.zero_bytes_skipped += zeros
            self.stats.read(got)
            self.source.bytes_fetched += got
            self.turn += 1
            self.cond.notify_all()
        return writes

    def halt(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()

    def finish(self) -> Finish:
        """After the last chunk: the qcow2 metadata after the data; the header for the sink's commit."""
        if self.writer is None:
            return Finish(b"", self.size, self.size)
        tail = self.writer.finish(self.size)
        try:
            pwritev_all(self.dst_fd, list(tail.metadata), self.pos)
        except OSError as exc:
            raise _failed(SinkError, f"{self.sink.spec}: write failed: {exc.strerror or exc}") from None
        return Finish(tail.header, tail.virtual_size, tail.output_size)


async def local_copy(
    source: Any, sink: Any, settings: Settings, stats: JobStats, threads: int = THREADS
) -> None:
    """Convert, then commit the sink; on failure the sink is left for the caller to abort.
    Only for a job that is `eligible`."""
    assert isinstance(source, FileSource)
    assert isinstance(sink, FileSink)
    copy = _Copy(source, sink, settings, stats)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(threads, thread_name_prefix="localcopy")
    workers = [executor.submit(copy.worker, k, threads) for k in range(threads)]
    try:
        await asyncio.gather(*(asyncio.wrap_future(w, loop=loop) for w in workers))
    except BaseException:
        copy.halt()
        # The workers hold the source and output descriptors: let each finish its chunk in hand (one
        # read and one write) before the caller's abort closes them; then the error goes on.
        # (Fresh wrappers: cancelling gather cancelled its own, not the threads.)
        await wait_out([asyncio.wrap_future(w, loop=loop) for w in workers])
        raise
    finally:
        executor.shutdown(wait=False)
    fin = await to_thread_to_end(copy.finish)
    stats.virtual_size = fin.virtual_size  # qcow2 rounds it up to whole sectors
    await sink.complete(fin)
