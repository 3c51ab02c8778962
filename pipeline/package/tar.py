"""A tar archive read as it streams by: headers parsed, member bodies handed on, nothing extracted.

OVA packages and UEC tarballs are tar (ustar, GNU or pax). Only what a package needs is understood:
regular files and directories, long names (GNU `L` records and pax `path`), large sizes (base-256
and pax `size`). Sparse members, and headers whose checksum is wrong, are refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import Chunk
from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage

BLOCK = 512
MAX_META = 1024 * 1024  # a pax record set or GNU long name larger than this is refused
MAX_MEMBERS = 10_000
MAX_NAME = 4096  # PATH_MAX: a longer member name is not a file anyone can have

# Header field offsets and lengths (POSIX ustar; GNU and pax share them).
NAME = (0, 100)
SIZE = (124, 12)
CHKSUM = (148, 8)
TYPEFLAG = 156
MAGIC = (257, 6)
PREFIX = (345, 155)

REGULAR = (b"0", b"\x00", b"7")  # 7: contiguous file, a regular file to every reader
DIRECTORY = b"5"
LINKS = (b"1", b"2")
NO_BODY = (*LINKS, b"3", b"4", DIRECTORY, b"6")  # links, devices, directories, FIFOs: header only


def _field(block: bytes, where: tuple[int, int]) -> bytes:
    off, n = where
    return block[off : off + n]


def _number(raw: bytes, what: str) -> int:
    if raw[:1] == b"\x80":  # GNU base-256: sizes of 8 GiB and more
        return int.from_bytes(raw[1:], "big")
    if raw[:1] == b"\xff":
        raise CorruptImage(f"tar header: negative {what}")
    text = raw.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptImage(f"tar header: {what} {text[:16]!r} is not an octal number") from None


@dataclass(frozen=True, slots=True)
class TarHeader:
    name: str
    size: int
    typeflag: bytes

    @classmethod
    def from_bytes(cls, block: bytes) -> TarHeader:
        want = _number(_field(block, CHKSUM), "checksum")
        # The checksum is the sum of the header's bytes with its own field counted as spaces.
        got = sum(block) - sum(_field(block, CHKSUM)) + 8 * 0x20
        if want != got:
            raise CorruptImage(f"tar header checksum is {want:o}, its bytes sum to {got:o}: not a tar stream")
        name = _field(block, NAME).split(b"\x00", 1)[0]
        if _field(block, MAGIC).startswith(b"ustar"):
            prefix = _field(block, PREFIX).split(b"\x00", 1)[0]
            if prefix and _field(block, MAGIC) == b"ustar\x00":  # POSIX; GNU puts atime/ctime there
                name = prefix + b"/" + name
        return cls(
            name.decode("utf-8", "surrogateescape"), _number(_field(block, SIZE), "size"), block[TYPEFLAG:157]
        )

    @property
    def regular(self) -> bool:
        return self.typeflag in REGULAR


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    size: int
    offset: int  # of its data in the archive
    regular: bool
    link: bool


class ChunkCursor:
    """A chunk queue read as bytes: exact small reads (headers), and views of the chunks (bodies)."""

    def __init__(self, q: ClosableQueue[Chunk]) -> None:
        self.q = q
        self.chunk: Chunk | None = None
        self.pos = 0
        self.offset = 0  # bytes consumed from the start of the stream
        self.eof = False

    async def _fill(self) -> bool:
        while self.chunk is None or self.pos >= self.chunk.length:
            if self.chunk is not None:
                self.chunk.release()
                self.chunk = None
            if self.eof:
                return False
            nxt = await self.q.get()
            if nxt is None:
                self.eof = True
                return False
            self.chunk, self.pos = nxt, 0
        return True

    async def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the stream."""
        out = bytearray()
        while len(out) < n and await self._fill():
            assert self.chunk is not None
            take = min(n - len(out), self.chunk.length - self.pos)
            out += self.chunk.view(self.pos, self.pos + take)
            self.pos += take
            self.offset += take
        return bytes(out)

    async def pieces(self, n: int) -> AsyncIterator[memoryview]:
        """The next n bytes as views into the chunks; each view is valid until the next one is asked for.
        Raises CorruptImage if the stream ends first."""
        left = n
        while left:
            if not await self._fill():
                raise CorruptImage(f"archive ends inside a member, {left} bytes short")
            assert self.chunk is not None
            take = min(left, self.chunk.length - self.pos)
            view = self.chunk.view(self.pos, self.pos + take)
            self.pos += take
            self.offset += take
            left -= take
            yield view

    async def skip(self, n: int) -> None:
        async for _ in self.pieces(n):
            pass

    def release(self) -> None:
        if self.chunk is not None:
            self.chunk.release()
            self.chunk = None


def _pax(data: bytes) -> dict[str, str]:
    """pax extended header records: "LEN key=value\\n"."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise CorruptImage("tar pax header: a record length is not a number") from None
        if length <= sp - pos or pos + length > len(data):
            raise CorruptImage("tar pax header: a record overruns the header")
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


async def members(cursor: ChunkCursor) -> AsyncIterator[Member]:
    """Each member in archive order. The caller may read up to `size` bytes of its body from the
    cursor before asking for the next; what it leaves, and the padding, is skipped here."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    count = 0
    while True:
        block = await cursor.read(BLOCK)
        if not block:
            return  # no end-of-archive blocks: tolerated, as GNU tar and Python's tarfile do
        if len(block) < BLOCK:
            raise CorruptImage(f"archive is truncated: a header of {len(block)} bytes at its end")
        if block == bytes(BLOCK):
            return  # end-of-archive marker (whatever follows is padding)
        hdr = TarHeader.from_bytes(block)
        padded = -(-hdr.size // BLOCK) * BLOCK
        if hdr.typeflag in (b"x", b"g", b"L", b"K"):
            if hdr.size > MAX_META:
                raise UnsafeImage(f"tar extended header of {hdr.size} bytes (more than {MAX_META})")
            data = await cursor.read(padded)
            if len(data) < padded:
                raise CorruptImage("archive is truncated inside an extended header")
            data = data[: hdr.size]
            if hdr.typeflag == b"x":
                pax = _pax(data)
                if any(k.startswith("GNU.sparse.") for k in pax):
                    raise UnsupportedImage(
                        f"tar member {pax.get('path', hdr.name)[:200]!r} is a sparse file (pax GNU.sparse); "
                        "repack it without --sparse"
                    )
            elif hdr.typeflag == b"L":
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            continue  # 'g' (global) and 'K' (long link target) say nothing a package needs
        if hdr.typeflag == b"S":
            raise UnsupportedImage(
                f"tar member {hdr.name!r} is a GNU sparse file; repack it without --sparse"
            )
        count += 1
        if count > MAX_MEMBERS:
            raise UnsafeImage(f"archive has more than {MAX_MEMBERS} members")
        name = pax.get("path") or long_name or hdr.name
        if len(name) > MAX_NAME:
            raise UnsafeImage(f"tar member name of {len(name)} characters (more than {MAX_NAME})")
        size = hdr.size
        if "size" in pax:
            if not pax["size"].isdigit():
                raise CorruptImage(f"tar pax header: size {pax['size'][:20]!r} is not a number")
            size = int(pax["size"])
            padded = -(-size // BLOCK) * BLOCK
        long_name, pax = None, {}
        if hdr.typeflag in NO_BODY:
            size = padded = 0
        start = cursor.offset
        yield Member(name, size, start, hdr.regular, hdr.typeflag in LINKS)
        used = cursor.offset - start
        if used > padded:
            raise AssertionError("a member's reader went past its body")
        await cursor.skip(padded - used)
