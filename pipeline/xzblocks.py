"""xz decoded block by block on several cores.

One xz stream is decoded by one core: at about 250 MB/s of output, a 4 GiB `.raw.xz` takes 17 s of
one CPU however many there are. Multi-threaded xz (`xz -T0`, the default of xz >= 5.6) writes a stream
as independent blocks whose headers carry their compressed and uncompressed sizes. Those blocks are
decoded here on a small pool of threads, in parallel, and handed on in order.

Each block is decoded as a stream of its own: the stream header, the block, and an index and footer
made for it, so liblzma itself checks the block's sizes and its integrity check (CRC32, CRC64 or
SHA-256) as it would in the whole file. The file's own index and footer are checked against the blocks
seen. A stream whose first block has no sizes (single-threaded xz), or whose blocks are larger than
PARALLEL_BLOCK_MAX, is handed to the one-core decoder (unwrap.XzInflater) from its start.

Two blocks decode at once: the first hands its pieces on as they come, the second keeps them until the
first is done. Memory: about one decoded block (24 MiB at xz -6) and two decoders' dictionaries.
"""

from __future__ import annotations

import lzma
import os
import queue
import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from pipeline.errors import CorruptImage, UnsupportedImage
from pipeline.malloc import limit_arenas
from pipeline.settings import MiB

XZ_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_SIZE = FOOTER_SIZE = 12
PARALLEL_BLOCK_MAX = 32 * MiB  # xz -6 -T0 writes 24 MiB blocks; -9 writes 192 MiB: those stream
IN_FLIGHT = 2  # blocks decoding at once: the one being handed on and the next
PIECE = 1024 * 1024  # a block is decoded and handed on in pieces of this size
SLICE = 256 * 1024  # compressed bytes handed to a decompressor per call


def _check_size(check_id: int) -> int:
    """Bytes of a block's integrity check, by the stream flags' check ID (xz spec 2.1.1.2)."""
    return 0 if check_id == 0 else 4 << ((check_id - 1) // 3)


def _vli(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """A variable-length integer at pos: (value, next position), or None if buf ends first."""
    value = 0
    for i in range(9):
        if pos + i >= len(buf):
            return None
        b = buf[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i:
                raise CorruptImage("xz data is corrupt: a size is not in its shortest encoding")
            return value, pos + i + 1
    raise CorruptImage("xz data is corrupt: a size field is longer than 9 bytes")


def _enc_vli(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _index(records: list[tuple[int, int]]) -> bytes:
    body = b"\x00" + _enc_vli(len(records)) + b"".join(_enc_vli(u) + _enc_vli(n) for u, n in records)
    body += bytes(-len(body) % 4)
    return body + struct.pack("<I", zlib.crc32(body))


def _footer(index_size: int, flags: bytes) -> bytes:
    tail = struct.pack("<I", index_size // 4 - 1) + flags
    return struct.pack("<I", zlib.crc32(tail)) + tail + FOOTER_MAGIC


def _decode_block(
    stream_header: bytes, block: deque[bytes], unpadded: int, size: int, out: queue.SimpleQueue[bytes | None]
) -> None:
    """One block, decoded as a stream of its own, its output put in pieces as it comes; None last.

    The input comes in slices: a decompressor keeps a copy of what a call leaves unread."""
    try:
        index = _index([(unpadded, size)])
        d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        block.appendleft(stream_header)
        block.append(index + _footer(len(index), stream_header[6:8]))
        while block:
            piece = d.decompress(block.popleft(), PIECE)  # each slice let go once read
            while True:
                if piece:
                    out.put(piece)
                if d.eof or d.needs_input:
                    break
                piece = d.decompress(b"", PIECE)
        if not d.eof:
            raise lzma.LZMAError("a block ends early")
    finally:
        out.put(None)


class ParallelXzInflater:
    """The unwrap stage's xz inflater (feed / pull / end / finish, see unwrap.Inflater)."""

    name = "xz"

    def __init__(self, sequential: Callable[[], Any], workers: int | None = None) -> None:
        self._sequential_factory = sequential
        self.seq: Any = None  # the one-core decoder, once a stream cannot be split
        self.buf = bytearray()
        self.state = "header"
        self.stream_header = b""
        self.check = 0
        self.records: list[tuple[int, int]] = []  # (unpadded size, uncompressed size) per block
        self.index_size = 0
        self.streams = 0
        self.futures: deque[Future[None]] = deque()
        self.queues: deque[queue.SimpleQueue[bytes | None]] = deque()
        self.out: deque[bytes] = deque()
        self.ended = False
        self.draining = False
        self.closed = False  # the next stream goes to the one-core decoder once these blocks are out
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.pool: ThreadPoolExecutor | None = None

    def feed(self, data: bytes) -> None:
        if self.seq is not None:
            self.seq.feed(data)
        else:
            self.buf += data

    def end(self) -> None:
        """The input has ended: pull() now waits for the blocks still being decoded."""
        self.ended = True

    def pull(self, max_len: int) -> bytes:
        while True:
            if self.seq is not None:
                out: bytes = self.seq.pull(max_len)
                return out
            if self.queues:
                # What the first block has decoded so far, without waiting.
                q = self.queues[0]
                have = sum(len(p) for p in self.out)
                while have < max_len:
                    try:
                        piece = q.get_nowait()
                    except queue.Empty:
                        break
                    if piece is None:
                        self._block_done()
                        break
                    self.out.append(piece)
                    have += len(piece)
            if self.out:
                return self._take(max_len)
            if self._parse():
                continue
            if not self.queues:
                return b""  # more input
            if not (self.ended or self.draining or len(self.queues) >= IN_FLIGHT):
                return b""  # more input, while the first block keeps decoding
            piece = self.queues[0].get()  # both cores busy (or nothing more to read): wait
            if piece is None:
                self._block_done()
            else:
                self.out.append(piece)

    def _block_done(self) -> None:
        self.queues.popleft()
        fut = self.futures.popleft()
        try:
            fut.result()
        except CancelledError:
            raise CorruptImage("xz data: the decoder was closed") from None
        except lzma.LZMAError as exc:
            raise CorruptImage(f"xz data is corrupt: {' '.join(str(exc).split())}") from None

    def _take(self, max_len: int) -> bytes:
        """Up to max_len bytes of the decoded pieces, joined (one copy, as the caller's chunks need)."""
        parts: list[bytes] = []
        n = 0
        out = self.out
        while out and n < max_len:
            piece = out.popleft()
            if n + len(piece) > max_len:
                out.appendleft(piece[max_len - n :])
                piece = piece[: max_len - n]
            parts.append(piece)
            n += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> None:
        try:
            if self.seq is not None:
                self.seq.finish()
                return
            if self.queues or self.out:
                raise CorruptImage("xz data was not all handed on")  # end() was not called
            if self.state == "padding" and self.buf.strip(b"\0") == b"" and len(self.buf) % 4 == 0:
                return
            raise CorruptImage("xz data is truncated: the compressed stream ends in the middle")
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
            for q in self.queues:  # a cancelled block never ends its queue: a waiting pull() must not hang
                q.put(None)

    # -- the stream's structure ----------------------------------------------------------------------

    def _parse(self) -> bool:
        """Consume what the buffer holds of the stream's structure; True if anything was."""
        buf = self.buf
        if self.state == "padding":
            n = len(buf) - len(buf.lstrip(b"\0"))
            if n:
                if n % 4 and n != len(buf):
                    raise CorruptImage("xz data is corrupt: stream padding is not a multiple of 4 bytes")
                del buf[: n - n % 4]
                return n >= 4
            if not buf:
                return False
            if not XZ_MAGIC.startswith(bytes(buf[:6])):
                raise CorruptImage(
                    f"xz data is corrupt: unexpected data after {self.streams} complete stream(s)"
                )
            if len(buf) < len(XZ_MAGIC):
                return False
            self.state = "header"
        if self.state == "header":
            if len(buf) < HEADER_SIZE:
                return False
            if (
                buf[:6] != XZ_MAGIC
                or buf[6]
                or buf[7] & 0xF0
                or zlib.crc32(buf[6:8]) != struct.unpack_from("<I", buf, 8)[0]
            ):
                raise CorruptImage("xz data is corrupt: a bad stream header")
            self.stream_header = bytes(buf[:HEADER_SIZE])
            self.check = _check_size(buf[7] & 0x0F)
            self.records = []
            self.state = "block"
            del buf[:HEADER_SIZE]
            return True
        if self.state == "block":
            return self._block()
        if self.state == "index":
            return self._stream_index()
        if self.state == "footer":
            if len(buf) < FOOTER_SIZE:
                return False
            crc, backward = struct.unpack_from("<II", buf, 0)
            if (
                buf[10:12] != FOOTER_MAGIC
                or zlib.crc32(buf[4:10]) != crc
                or bytes(buf[8:10]) != self.stream_header[6:8]
                or (backward + 1) * 4 != self.index_size
            ):
                raise CorruptImage(
                    "xz data is corrupt: the stream footer does not match its header and index"
                )
            del buf[:FOOTER_SIZE]
            self.streams += 1
            self.state = "padding"
            return True
        raise AssertionError(self.state)

    def _block(self) -> bool:
        buf = self.buf
        if not buf:
            return False
        if buf[0] == 0:
            self.state = "index"
            return True
        hsize = (buf[0] + 1) * 4
        if len(buf) < hsize:
            return False
        flags = buf[1]
        pos = 2
        csize = usize = None
        head = bytes(buf[: hsize - 4])  # the size fields must end inside the header, before its CRC32
        if flags & 0x40:
            got = _vli(head, pos)
            if got is None:
                raise CorruptImage("xz data is corrupt: a block header's sizes run past its end")
            csize, pos = got
        if flags & 0x80:
            got = _vli(head, pos)
            if got is None:
                raise CorruptImage("xz data is corrupt: a block header's sizes run past its end")
            usize, pos = got
        if zlib.crc32(buf[: hsize - 4]) != struct.unpack_from("<I", buf, hsize - 4)[0]:
            raise CorruptImage("xz data is corrupt: a block header's CRC32 does not match")
        # A block held whole must be small; LZMA2 stores random data with a tiny overhead, so a larger
        # compressed size is not one of xz's blocks: the one-core decoder streams (and judges) it.
        if (
            csize is None
            or usize is None
            or usize > PARALLEL_BLOCK_MAX
            or csize > usize + (usize >> 6) + 64 * 1024
        ):
            if self.records:
                raise UnsupportedImage(
                    "xz stream mixes blocks with and without sizes in their headers; decompress it with xz"
                )
            if self.queues or self.out:
                self.draining = True  # the previous stream's blocks go first; pull() waits for them
                return False
            self._go_sequential()
            return True
        total = hsize + csize + (-csize % 4) + self.check
        if len(buf) < total:
            return False
        if len(self.queues) >= IN_FLIGHT:
            return False
        # The block in slices the decoder lets go of as it reads them (a block of random data is as
        # large compressed as decoded).
        block = deque(bytes(buf[off : min(off + SLICE, total)]) for off in range(0, total, SLICE))
        self.buf = bytearray(buf[total:])  # not del: a bytearray keeps its allocation (a whole block)
        unpadded = hsize + csize + self.check
        self.records.append((unpadded, usize))
        if self.closed:
            raise CorruptImage("xz data: the decoder was closed")  # the job is failing already
        if self.pool is None:
            limit_arenas()  # a no-op when the CLI did it at start, as it should
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="xz")
        q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.queues.append(q)
        self.futures.append(self.pool.submit(_decode_block, self.stream_header, block, unpadded, usize, q))
        return True

    def _stream_index(self) -> bool:
        buf = self.buf
        got = _vli(buf, 1)
        if got is None:
            return False
        count, pos = got
        if count != len(self.records):  # before reading them: a hostile count must not be buffered for
            raise CorruptImage(
                "xz data is corrupt: the stream index does not list the blocks the stream holds"
            )
        records: list[tuple[int, int]] = []
        for _ in range(count):
            a = _vli(buf, pos)
            if a is None:
                return False
            b = _vli(buf, a[1])
            if b is None:
                return False
            records.append((a[0], b[0]))
            pos = b[1]
        end = pos + (-pos % 4)
        if len(buf) < end + 4:
            return False
        if zlib.crc32(buf[:end]) != struct.unpack_from("<I", buf, end)[0] or buf[pos:end].strip(b"\0"):
            raise CorruptImage("xz data is corrupt: a bad stream index")
        if records != self.records:
            raise CorruptImage(
                "xz data is corrupt: the stream index does not list the blocks the stream holds"
            )
        self.index_size = end + 4
        del buf[: end + 4]
        self.state = "footer"
        return True

    def _go_sequential(self) -> None:
        """This stream's blocks have no sizes: the one-core decoder takes it, and the rest, from here."""
        self.seq = self._sequential_factory()
        rest = self.stream_header + bytes(self.buf)
        self.buf = bytearray()
        self.seq.feed(rest)
        self.close()
