"""The unwrap stage: gzip, xz, bzip2 and zstd peeled off the chunk stream, between source and sniff.

    source -> [unwrap: gzip | xz | bz2 | zstd]* -> sniff -> decode -> ...

It looks at the head of the stream; a compressed stream is decompressed into new pooled chunks and
looked at again (a gzip inside zstd is peeled too, up to MAX_DEPTH layers); anything else passes
through untouched. Every decompressor call runs in a worker thread (the event loop keeps serving the
source and the sink) and returns at most one chunk of output, so a layer holds a bounded amount of
memory whatever the compression ratio: zlib, lzma and bz2 through their decompressors' max_length,
zstd by handing the decompressor whole blocks (each decodes to at most 128 KiB), a chunk's worth at a
time.

Inside a wrapper the image is sequential-only: the runner takes the stream path and the decoders run
in their one-pass mode. Bombs are refused (exit 3): beyond the first 64 MiB, a layer's output may not
exceed IMGPIPE_MAX_DECOMPRESSION_RATIO times the compressed bytes read from the source so far.
"""

from __future__ import annotations

import asyncio
import bz2
import lzma
import types
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import CorruptImage, UnsafeImage
from pipeline.formats import sniff
from pipeline.formats.base import Match
from pipeline.formats.probes import CPIO_MAGICS, WRAPPERS, Bzip2Probe
from pipeline.settings import MiB, Settings
from pipeline.sources.base import ChunkFiller
from pipeline.stages import collect_head
from pipeline.stats import JobStats


def _gzip_library() -> tuple[types.ModuleType, str]:
    """ISA-L's inflate: several times zlib's speed on the same streams; the stdlib is the fallback.
    Imported with the first gzip input, as zstandard is with the first zstd one."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency, but keep working without it
        return zlib, "zlib"
    return isal_zlib, "isal"


MAX_DEPTH = 4
RATIO_GRACE = 64 * MiB  # output below this is never judged by the ratio
SLICE = 256 * 1024  # compressed bytes handed to zlib per call: bounds the copy of its unconsumed tail
ZSTD_BLOCK_MAX = 128 * 1024  # a zstd block never decodes to more (RFC 8878, Block_Maximum_Size)

GZIP_MAGIC = b"\x1f\x8b\x08"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def wrapper_of(head: bytes) -> str | None:
    """The wrapper the head of a stream starts with, or None."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if Bzip2Probe.matches(head):
        return "bzip2"
    return None


class Inflater(Protocol):
    name: str

    def feed(self, data: bytes) -> None:
        """More compressed input; only called once pull() has returned b"" (all input used)."""

    def pull(self, max_len: int) -> bytes:
        """Up to max_len decompressed bytes; b"" when more input is needed."""

    def finish(self) -> None:
        """The input ended: raise CorruptImage unless it ended between members/streams/frames."""


def _corrupt(name: str, exc: BaseException | str) -> CorruptImage:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return CorruptImage(f"{name} data is corrupt: {text}")


def _truncated(name: str) -> CorruptImage:
    return CorruptImage(f"{name} data is truncated: the compressed stream ends in the middle")


class _Members:
    """A sequence of members (gzip), streams (xz, bzip2), each with its own decompressor object."""

    name = ""
    magic = b""
    padding = False  # zero bytes allowed between and after members
    align = 1  # ... in multiples of this many (xz: 4)

    def __init__(self) -> None:
        self.d: Any = None
        self.carry = b""  # input the last call left over (unconsumed tail, or the next member's start)
        self.view = memoryview(b"")
        self.pos = 0
        self.members = 0
        self.zeros = 0  # padding since the last member ended

    def feed(self, data: bytes) -> None:
        self.view, self.pos = memoryview(data), 0

    def _take(self, limit: int) -> bytes | memoryview:
        if self.carry:
            c, self.carry = self.carry, b""
            return c
        s = self.view[self.pos : self.pos + limit]
        self.pos += len(s)
        return s

    def _have_input(self) -> bool:
        return bool(self.carry) or self.pos < len(self.view)

    def _new(self) -> Any:
        raise NotImplementedError

    def _step(self, max_len: int) -> bytes | None:
        """One decompressor call; None when it needs input and there is none."""
        raise NotImplementedError

    def _start_member(self) -> bool:
        """At a member boundary: check the magic of what comes next; False if more input is needed."""
        data, self.carry = self.carry, b""
        while True:
            if self.padding and self.members:
                stripped = data.lstrip(b"\0")
                self.zeros += len(data) - len(stripped)
                data = stripped
            if len(data) >= len(self.magic):
                break
            more = self.view[self.pos : self.pos + SLICE]
            self.pos += len(more)
            if not more:
                if not self.magic.startswith(data):
                    break
                self.carry = data  # too short to judge: wait for the rest
                return False
            data += bytes(more)
        if not data.startswith(self.magic):
            raise _corrupt(self.name, f"unexpected data after {self.members} complete stream(s)")
        self._check_padding()
        self.carry = data
        self.d = self._new()
        return True

    def pull(self, max_len: int) -> bytes:
        try:
            while True:
                if self.d is None and not self._start_member():
                    return b""
                out = self._step(max_len)
                if self.d.eof:
                    self.carry = self.d.unused_data + self.carry if self.d.unused_data else self.carry
                    self.d = None
                    self.members += 1
                if out:
                    return out
                if out is None:
                    return b""
        except CorruptImage:
            raise
        except Exception as exc:
            raise _corrupt(self.name, exc) from None

    def _check_padding(self) -> None:
        if self.zeros % self.align:
            raise _corrupt(self.name, f"{self.zeros} bytes of stream padding, not a multiple of {self.align}")
        self.zeros = 0

    def finish(self) -> None:
        if self.d is not None or self._have_input():
            raise _truncated(self.name)
        if not self.members:
            raise _truncated(self.name)
        self._check_padding()


class _ZlibMembers(_Members):
    """zlib-style objects: max_length leaves the input not used in unconsumed_tail."""

    def _step(self, max_len: int) -> bytes | None:
        data = self._take(SLICE)
        out: bytes = self.d.decompress(data, max_len)
        if not data:
            # No input left: this call only drains output zlib held back at the last max_length.
            return out or None
        if not self.d.eof:
            self.carry = self.d.unconsumed_tail
        return out


class _LzmaStyleMembers(_Members):
    """lzma and bz2 objects: they buffer the input; needs_input says when to give more."""

    def _step(self, max_len: int) -> bytes | None:
        if self.d.needs_input:
            data = self._take(SLICE)
            if not data:
                return None
        else:
            data = b""
        out: bytes = self.d.decompress(data, max_len)
        return out


class GzipInflater(_ZlibMembers):
    name = "gzip"
    magic = GZIP_MAGIC
    padding = True  # gzip(1) ignores trailing zeros (tape padding)

    def __init__(self) -> None:
        super().__init__()
        self.zlib, self.library = _gzip_library()

    def _new(self) -> Any:
        return self.zlib.decompressobj(31)


class XzInflater(_LzmaStyleMembers):
    name = "xz"
    magic = XZ_MAGIC
    padding = True  # xz stream padding: zero bytes between and after streams, 4 at a time
    align = 4

    def _new(self) -> Any:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)


class Bzip2Inflater(_LzmaStyleMembers):
    name = "bzip2"
    magic = b"BZh"

    def _new(self) -> Any:
        return bz2.BZ2Decompressor()


class ZstdInflater:
    """Frames parsed just enough to hand the decompressor whole blocks, at most max_len's worth."""

    name = "zstd"

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # parsed up to here; buf[:pos] is handed over, buf[pos:] waits
        self.state = "frame"  # frame | block | checksum | skip
        self.checksum = False
        self.skip = 0
        self.frames = 0
        self.d: Any = None
        import zstandard

        self.dctx = zstandard.ZstdDecompressor()
        self.error: type[Exception] = zstandard.ZstdError

    def feed(self, data: bytes) -> None:
        del self.buf[: self.pos]
        self.pos = 0
        self.buf += data

    def _parse(self, budget: int) -> tuple[int, bool]:
        """Advance over whole units; returns (bytes to hand to the decompressor, frame ended)."""
        buf, start = self.buf, self.pos
        while True:
            avail = len(buf) - self.pos
            if self.state == "frame":
                if avail < 5:
                    break
                magic = int.from_bytes(buf[self.pos : self.pos + 4], "little")
                if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                    if avail < 8:
                        break
                    if self.pos > start:
                        break  # hand over what precedes it first
                    self.skip = int.from_bytes(buf[self.pos + 4 : self.pos + 8], "little")
                    del buf[: self.pos + 8]
                    self.pos = start = 0
                    self.state = "skip"
                    continue
                if buf[self.pos : self.pos + 4] != ZSTD_MAGIC:
                    raise _corrupt(self.name, f"unexpected data after {self.frames} complete frame(s)")
                fhd = buf[self.pos + 4]
                single = fhd >> 5 & 1
                fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
                size = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
                if avail < size:
                    break
                self.checksum = bool(fhd & 4)
                self.pos += size
                self.state = "block"
            elif self.state == "skip":
                n = min(self.skip, avail)
                del buf[self.pos : self.pos + n]
                self.skip -= n
                if self.skip:
                    break
                self.state = "frame"
            elif self.state == "block":
                if avail < 3 or budget < ZSTD_BLOCK_MAX:
                    break
                h = int.from_bytes(buf[self.pos : self.pos + 3], "little")
                kind, size = h >> 1 & 3, h >> 3
                if kind == 3:
                    raise _corrupt(self.name, "reserved block type")
                payload = 1 if kind == 1 else size
                if avail < 3 + payload:
                    break
                self.pos += 3 + payload
                budget -= ZSTD_BLOCK_MAX
                if h & 1:
                    self.state = "checksum" if self.checksum else "end"
            elif self.state == "checksum":
                if avail < 4:
                    break
                self.pos += 4
                self.state = "end"
            if self.state == "end":
                self.state = "frame"
                return self.pos - start, True
        return self.pos - start, False

    def pull(self, max_len: int) -> bytes:
        try:
            while True:
                start = self.pos
                n, ended = self._parse(max(max_len, ZSTD_BLOCK_MAX))
                if not n:
                    return b""
                if self.d is None:
                    self.d = self.dctx.decompressobj()
                out: bytes = self.d.decompress(bytes(self.buf[start : start + n]))
                if ended:
                    self.d = None
                    self.frames += 1
                if out:
                    return out
        except CorruptImage:
            raise
        except self.error as exc:
            raise _corrupt(self.name, exc) from None

    def finish(self) -> None:
        if self.state != "frame" or self.pos < len(self.buf) or not self.frames:
            raise _truncated(self.name)


def _xz() -> Inflater:
    # Blocks with sizes (multi-threaded xz) decode on several cores; others on one (XzInflater).
    from pipeline.xzblocks import ParallelXzInflater

    return ParallelXzInflater(XzInflater)


INFLATERS: dict[str, Callable[[], Inflater]] = {
    "gzip": GzipInflater,
    "xz": _xz,
    "bzip2": Bzip2Inflater,
    "zstd": ZstdInflater,
}
assert set(INFLATERS) == WRAPPERS


class StreamView:
    """What the stages after unwrap see of the source: the source itself, or, once a wrapper is found,
    a sequential stream of unknown size (no ranges: they would address the compressed file)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.spec = source.spec
        self.size: int | None = source.size
        self.ranged: bool = source.ranged
        self.wrappers: list[str] = []
        self.payload: Match | None = None  # decided here, without sniffing (a compressed initramfs)

    async def read_range(self, offset: int, length: int) -> bytes:
        data: bytes = await self.source.read_range(offset, length)
        return data


def _compressed_cpio(kind: str, head: bytes) -> bool:
    """Whether the first bytes inside the compression are a cpio archive's (an initramfs)."""
    inflater = INFLATERS[kind]()
    try:
        inflater.feed(head)
        return inflater.pull(6) in CPIO_MAGICS
    except Exception:  # a broken stream is the inflate layer's to report
        return False
    finally:
        _close(inflater)


def _close(inflater: Inflater) -> None:
    close = getattr(inflater, "close", None)
    if close is not None:
        close()


async def _inflate(
    inflater: Inflater,
    held: list[Chunk],
    inq: ClosableQueue[Chunk],
    outq: ClosableQueue[Chunk],
    pool: BufferPool,
    settings: Settings,
    stats: JobStats,
) -> None:
    """One layer: compressed chunks in, decompressed pooled chunks out."""
    name = inflater.name
    ratio = settings.max_decompression_ratio
    produced = 0

    def count(n: int) -> None:
        nonlocal produced
        produced += n

    filler = ChunkFiller(pool, outq, count)

    async def drain() -> None:
        while True:
            out = await asyncio.to_thread(inflater.pull, pool.size)
            if not out:
                return
            total = produced + (filler.cur.length if filler.cur is not None else 0) + len(out)
            if total > RATIO_GRACE and total > ratio * max(stats.bytes_read, 1):
                raise UnsafeImage(
                    f"{name} data decompresses to more than {ratio} times the compressed bytes "
                    f"read ({total} from {stats.bytes_read}): a decompression bomb? Raise "
                    "IMGPIPE_MAX_DECOMPRESSION_RATIO if this image is expected"
                )
            await filler.feed(out)

    pending = list(held)
    held.clear()
    try:
        while True:
            chunk = pending.pop(0) if pending else await inq.get()
            if chunk is None:
                break
            try:
                inflater.feed(bytes(chunk.view()))
            finally:
                chunk.release()
            await drain()
        end = getattr(inflater, "end", None)
        if end is not None:  # an inflater that decodes ahead hands on what it still holds
            end()
            await drain()
        inflater.finish()
    except BaseException:
        if filler.cur is not None:
            filler.cur.release()
            filler.cur = None
        raise
    finally:
        for c in pending:
            c.release()
        _close(inflater)
    await filler.finish()


def layer_pool(settings: Settings) -> BufferPool:
    """Chunks of one layer's output (or of a decoder after it): its own pool, so a source that holds
    every chunk of the job's pool cannot starve the stage that would free them."""
    return BufferPool(settings.queue_depth + 4, settings.chunk_size)


async def unwrap_stage(
    view: StreamView,
    inq: ClosableQueue[Chunk],
    outq: ClosableQueue[Chunk],
    settings: Settings,
    stats: JobStats,
) -> None:
    """Peel wrappers off the stream until its head is something else, then pass that on."""
    held: list[Chunk] = []
    try:
        async with asyncio.TaskGroup() as tg:
            q = inq
            while True:
                held = []
                head = await collect_head(q, held)
                kind = wrapper_of(head)
                if kind is None:
                    break
                if not view.wrappers and _compressed_cpio(kind, head):
                    # A compressed initramfs is a ramdisk as it stands: copied unchanged, not peeled.
                    view.payload = Match("ramdisk", f"{kind}-compressed cpio initramfs")
                    break
                if len(view.wrappers) >= MAX_DEPTH:
                    raise UnsafeImage(
                        f"image is wrapped more than {MAX_DEPTH} times ({' in '.join(view.wrappers)}, "
                        f"then {kind}); refusing to peel more"
                    )
                sniff.decide(head, None, None, allow_wrappers=True)  # refuses a polyglot
                view.wrappers.append(kind)
                stats.source_wrappers = list(view.wrappers)
                view.size, view.ranged = None, False
                inner: ClosableQueue[Chunk] = ClosableQueue(settings.queue_depth)
                layer = _inflate(INFLATERS[kind](), held, q, inner, layer_pool(settings), settings, stats)
                held = []
                tg.create_task(layer)
                q = inner
            for chunk in held:
                await outq.put(chunk)
            held = []
            async for chunk in q:
                await outq.put(chunk)
            await outq.close()
    except BaseExceptionGroup as group:
        for exc in group.exceptions:
            if not isinstance(exc, asyncio.CancelledError):
                raise exc from None
        raise
    finally:
        for chunk in held:
            chunk.release()
