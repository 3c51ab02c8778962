"""VMDK input (VMware's Virtual Disk Format 5.0 spec; qemu's block/vmdk.c for the limits it enforces).

- A hosted sparse extent ("KDMV") as the source: monolithicSparse (grain directory -> grain tables ->
  grains; GTE 1 is a zero grain when the header says so; the redundant directory is ignored) and
  streamOptimized (deflated grains, each behind a marker with its LBA and size; tables at the front
  as qemu writes them, or after their grains with the directory in a footer as VMware writes them).
- A text descriptor as the source, whose extents (FLAT, SPARSE, ZERO) are sibling objects of the
  descriptor, opened through ImageReader.sibling(): monolithicFlat, twoGbMaxExtentFlat,
  twoGbMaxExtentSparse, and monolithicSparse / streamOptimized descriptors over sparse extents.

With a range-capable reader the grain tables are read lazily (contiguous tables in one request), and
a compressed grain's stored bytes run to the next structure the tables know of, so neighbouring
grains coalesce into one read and no byte is fetched twice. With a sequential reader, tables that
come before the data (qemu's layout, both subformats) are read up front, bounded by the reorder
buffer; a streamOptimized file with its tables after the grains (VMware's layout) is read by walking
its grain markers, and each grain table and the directory are checked against the grains passed.

Refused: delta links (parentCID / parentFileNameHint), ESX types (vmfs*, COWD, seSparse), custom
and unknown types, extents that are not bare sibling file names, missing extents.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

from pipeline.errors import CorruptImage, InputRefused, SourceError, UnsafeImage, UnsupportedImage, is_missing
from pipeline.formats.layout import Decoder, ImageInfo, ImageReader, Piece
from pipeline.settings import MiB, Settings, TiB

_inflate: ModuleType
try:
    from zlib_ng import zlib_ng as _inflate
except ImportError:  # the stdlib is the fallback: same format, slower
    _inflate = zlib
# zlib-ng raises its own error class, not a subclass of zlib.error.
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, getattr(_inflate, "error", zlib.error))

SECTOR = 512
MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"  # ESX (vmfsSparse) sparse extent
SESPARSE_MAGIC = b"\xbe\xba\xfe\xca"  # 0xcafebabe little-endian

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
NL_CHECK = b"\n \r\n"  # damaged by a text-mode transfer if it reads otherwise
GTE_ZERO = 1  # a zero grain, when FLAG_ZERO_GRAIN is set

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
_MARKER = struct.Struct("<QII")  # value (LBA or sectors), size (0 for metadata), type (metadata only)
GRAIN_MARKER_SIZE = 12  # LBA + size, then the deflated bytes
# With the directory at the end, the last three sectors are: footer marker, footer (a header), EOS.
FOOTER_MARKER_FROM_END = 3 * SECTOR

MAX_VERSION = 3
MAX_GTES = 512  # qemu: "L2 table size too big" above this
MAX_GRAIN_SECTORS = 0x200000  # qemu: a 1 GiB grain is "unrealistic"
MAX_COMPRESSED_GRAIN = 2 * MiB  # each compressed grain is inflated whole, in memory
MAX_GD_BYTES = 8 * MiB  # 2 Mi grain tables: 64 TiB with 64 KiB grains
MAX_DESCRIPTOR = 1 * MiB  # qemu reads at most 1 MiB - 1 of a descriptor
QEMU_DESC_WINDOW = 20 * SECTOR  # qemu looks for CID and parentFileNameHint in 10 KiB at sector 1
MAX_EXTENTS = 10_000
TABLE_BATCH = 256 * 1024  # contiguous grain tables fetched in one ranged read
_LITTLE = sys.byteorder == "little"

# createType values: what we convert, and what the refusal says for the rest.
FLAT_TYPES = frozenset({"monolithicFlat", "twoGbMaxExtentFlat"})
SPARSE_TYPES = frozenset({"monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"})
_ESX_HINT = "an ESX datastore type; export the disk as streamOptimized (OVF) or convert it on the host"


def _le32(raw: bytes) -> array[int]:
    table = array("I", raw)
    if not _LITTLE:
        table.byteswap()
    return table


def _sectors(n: int) -> int:
    """Bytes rounded up to whole sectors."""
    return -(-n // SECTOR) * SECTOR


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """The hosted sparse extent header (sector 0, and the footer of a streamOptimized file)."""

    magic: bytes
    version: int
    flags: int
    capacity: int  # sectors
    granularity: int  # sectors per grain
    desc_offset: int  # sectors
    desc_size: int  # sectors
    num_gtes: int  # entries per grain table
    rgd_offset: int  # sectors
    gd_offset: int  # sectors, or GD_AT_END
    grain_offset: int  # sectors: where the grains start
    filler: int
    check: bytes
    compression: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sIIQQQQIQQQB4sH")

    @classmethod
    def from_bytes(cls, data: bytes) -> SparseHeader:
        if len(data) < cls.STRUCT.size:
            raise CorruptImage(f"vmdk: sparse header is {len(data)} bytes, shorter than {cls.STRUCT.size}")
        return cls(*cls.STRUCT.unpack_from(data))

    @property
    def compressed(self) -> bool:
        return self.compression == COMPRESSION_DEFLATE

    @property
    def markers(self) -> bool:
        return self.compressed and bool(self.flags & FLAG_MARKERS)

    @property
    def zero_grains(self) -> bool:
        return bool(self.flags & FLAG_ZERO_GRAIN)

    @property
    def grain_bytes(self) -> int:
        return self.granularity * SECTOR

    @property
    def gd_entries(self) -> int:
        return -(-self.capacity // (self.num_gtes * self.granularity))

    def validate(self, where: str, settings: Settings) -> None:
        if self.magic != MAGIC:
            raise CorruptImage(f"{where}: sparse header magic is {self.magic!r}, not {MAGIC!r}")
        if not 1 <= self.version <= MAX_VERSION:
            raise UnsupportedImage(f"{where}: sparse header version {self.version} (only 1 to 3 exist)")
        if self.flags & FLAG_NL_DETECT and self.check != NL_CHECK:
            raise CorruptImage(
                f"{where}: the newline-check bytes read {self.check!r}, not {NL_CHECK!r}: the file was "
                "altered by a text-mode transfer (FTP ASCII mode, a text codec); transfer it as binary"
            )
        if self.compression not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
            raise UnsupportedImage(f"{where}: unknown grain compression algorithm {self.compression}")
        g = self.granularity
        if not (0 < g <= MAX_GRAIN_SECTORS and g & (g - 1) == 0):
            raise CorruptImage(
                f"{where}: grain size of {g} sectors (must be a power of two up to {MAX_GRAIN_SECTORS})"
            )
        if self.compressed and self.grain_bytes > MAX_COMPRESSED_GRAIN:
            raise UnsupportedImage(
                f"{where}: compressed grains of {self.grain_bytes} bytes "
                f"(over {MAX_COMPRESSED_GRAIN // MiB} MiB)"
            )
        if self.desc_size and self.desc_offset != 1:
            raise CorruptImage(
                f"{where}: the embedded descriptor is at sector {self.desc_offset}, not sector 1"
            )
        if self.desc_size * SECTOR >= MAX_DESCRIPTOR:
            raise CorruptImage(f"{where}: the embedded descriptor of {self.desc_size} sectors is over 1 MiB")
        if self.desc_size and self.grain_offset < self.desc_offset + self.desc_size:
            raise CorruptImage(
                f"{where}: grains start at sector {self.grain_offset}, inside the descriptor "
                f"(sectors {self.desc_offset}..{self.desc_offset + self.desc_size - 1})"
            )
        if not 1 <= self.num_gtes <= MAX_GTES:
            raise CorruptImage(
                f"{where}: {self.num_gtes} entries per grain table (qemu reads 1 to {MAX_GTES})"
            )
        cap = settings.max_virtual_size
        if self.capacity * SECTOR > cap:
            raise UnsafeImage(
                f"{where}: virtual size {self.capacity * SECTOR} is over the cap of {cap / TiB:g} TiB; "
                "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
            )
        if self.gd_entries * 4 > MAX_GD_BYTES:
            raise CorruptImage(
                f"{where}: a grain directory of {self.gd_entries} entries is over the "
                f"{MAX_GD_BYTES // MiB} MiB limit (capacity {self.capacity} sectors, "
                f"{self.num_gtes} x {g}-sector grains per table)"
            )


# --------------------------------------------------------------------------------------------------
# Descriptor


@dataclass(frozen=True, slots=True)
class ExtentLine:
    access: str  # RW, RDONLY (NOACCESS is refused)
    sectors: int
    kind: str  # FLAT, SPARSE, ZERO (others are refused)
    name: str
    offset: int  # sectors, FLAT only


@dataclass(frozen=True, slots=True)
class Descriptor:
    create_type: str
    version: str
    parent_cid: str
    parent_hint: str | None
    extents: tuple[ExtentLine, ...]


_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
_ACCESS_RE = re.compile(r"^(RW|RDONLY|NOACCESS)\s")
_KEY_RE = re.compile(r"^([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(raw: bytes, where: str = "vmdk") -> Descriptor:
    """The text descriptor: its keys and extent lines (up to the first NUL, as qemu reads it)."""
    raw = raw.split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # old descriptors: the name bytes as they are
    keys: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _ACCESS_RE.match(line):
            m = _EXTENT_RE.match(line)
            if not m:
                raise CorruptImage(f"{where}: cannot read the extent line {line[:120]!r}")
            access, sectors, kind, name, offset = m.groups()
            if len(extents) >= MAX_EXTENTS:
                raise UnsupportedImage(f"{where}: the descriptor lists more than {MAX_EXTENTS} extents")
            extents.append(
                ExtentLine(access, int(sectors), kind.upper(), name or "", int(offset) if offset else 0)
            )
            if kind.upper() == "FLAT" and (name is None or offset is None):
                raise CorruptImage(
                    f"{where}: FLAT extent line without a file name and offset: {line[:120]!r}"
                )
            continue
        m = _KEY_RE.match(line)
        if m:
            keys.setdefault(m.group(1), _unquote(m.group(2)))
    return Descriptor(
        create_type=keys.get("createType", ""),
        version=keys.get("version", ""),
        parent_cid=keys.get("parentCID", "ffffffff"),
        # qemu finds the parent link anywhere in the text, even in a comment: so do we.
        parent_hint=keys.get("parentFileNameHint", "" if "parentFileNameHint" in text else None),
        extents=tuple(extents),
    )


def check_parent(desc: Descriptor, where: str) -> None:
    if desc.parent_hint is not None:
        raise UnsupportedImage(
            f"{where}: the image is a snapshot (delta) of a parent disk (parentFileNameHint "
            f"{desc.parent_hint!r}); "
            "refusing: flatten the snapshot chain first (consolidate it, or qemu-img convert the top image)"
        )
    if desc.parent_cid.lower() != "ffffffff":
        raise UnsupportedImage(
            f"{where}: the image is a snapshot (delta) of a parent disk (parentCID={desc.parent_cid}); "
            "refusing: flatten the snapshot chain first"
        )


_UNSAFE_NAME_CHARS = frozenset("/\\:?#%") | frozenset(chr(c) for c in range(32)) | {"\x7f"}


def safe_extent_name(name: str) -> bool:
    """A bare file name beside the descriptor: no directories, no scheme, nothing a URL would
    reinterpret (query, fragment, percent-escapes)."""
    return (
        bool(name)
        and name not in (".", "..")
        and len(name) <= 255
        and not any(c in _UNSAFE_NAME_CHARS for c in name)
    )


class ExtentsReader(ImageReader):
    """The extent files of a descriptor as one file: file i occupies [base_i, base_i + size_i)."""

    def __init__(self, readers: list[ImageReader]) -> None:
        self.readers = readers
        self.bases: list[int] = []
        total = 0
        for r in readers:
            assert r.size is not None
            self.bases.append(total)
            total += r.size
        self.size = self.total = total
        self.ranged = True

    async def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        await self.read_into(offset, memoryview(out))
        return bytes(out)

    async def read_into(self, offset: int, view: memoryview) -> None:
        if offset < 0 or offset + len(view) > self.total:
            raise CorruptImage(
                f"vmdk: bytes {offset}-{offset + len(view) - 1} are needed but the extents hold {self.size}"
            )
        done = 0
        while done < len(view):
            i = bisect_right(self.bases, offset) - 1
            r = self.readers[i]
            local = offset - self.bases[i]
            assert r.size is not None
            n = min(len(view) - done, r.size - local)
            await r.read_into(local, view[done : done + n])
            done += n
            offset += n


# --------------------------------------------------------------------------------------------------
# Extents


class _Extent:
    def __init__(self, guest: int, length: int) -> None:
        self.guest = guest  # guest offset of the extent's first byte
        self.length = length

    async def pieces(self) -> AsyncIterator[Piece]:
        none: list[Piece] = []  # a ZERO extent: nothing stored
        for p in none:
            yield p


class _FlatExtent(_Extent):
    def __init__(self, guest: int, length: int, file: int) -> None:
        super().__init__(guest, length)
        self.file = file

    async def pieces(self) -> AsyncIterator[Piece]:
        yield Piece(self.guest, self.length, self.file)


class _SparseExtent(_Extent):
    """One hosted sparse extent file, read through `reader`; its offsets appear at `base` in the
    decoder's (possibly composite) reader."""

    def __init__(
        self,
        where: str,
        reader: ImageReader,
        base: int,
        guest: int,
        settings: Settings,
        codecs: dict[str, int],
    ) -> None:
        super().__init__(guest, 0)
        self.where = where
        self.reader = reader
        self.base = base
        self.settings = settings
        self.codecs = codecs  # codec name -> grain bytes, shared with the decoder's decode()
        self.gd = array("I")
        self._tables: dict[int, array[int]] = {}
        self._tail: list[int] = []  # directory marker, footer, end: the last bounds of compressed grains
        self.walk = False  # a sequential streamOptimized file: follow its grain markers

    async def open(self, head: bytes | None = None) -> SparseHeader:
        r = self.reader
        size = r.size
        if head is None:
            head = await r.read(0, SECTOR)
        h = SparseHeader.from_bytes(head)
        h.validate(self.where, self.settings)
        if h.capacity == 0 and h.desc_offset:
            raise UnsupportedImage(
                f"{self.where}: a sparse header with capacity 0 that points to a descriptor"
            )
        self.header = h
        footer: SparseHeader | None = None
        if h.gd_offset == GD_AT_END:
            if not h.markers:
                raise CorruptImage(
                    f"{self.where}: the grain directory is 'at the end' but grains have no markers"
                )
            if r.ranged:
                footer = await self._footer(h)
                h = footer
            else:
                self.walk = True
        elif h.markers and not r.ranged and h.gd_offset >= h.grain_offset:
            self.walk = True  # tables after the grains; tables first (qemu's layout) are read first
        self.active = h  # the footer, when the directory is at the end
        self._check_rgd(h)
        if size is not None and h.grain_offset * SECTOR > size:
            raise CorruptImage(
                f"{self.where}: grains start at sector {h.grain_offset}, beyond the {size}-byte file"
            )
        self.length = h.capacity * SECTOR
        self.grain = h.grain_bytes
        self.codec = ""
        self._most = _sectors(GRAIN_MARKER_SIZE + 2 * self.grain) if h.markers else self.grain
        if h.compressed:
            self.codec = f"vmdk-{'marker' if h.markers else 'zlib'}-{self.grain}"
            self.codecs[self.codec] = self.grain
        if not self.walk:
            await self._directory(h, footer)
        return self.header

    async def _footer(self, h: SparseHeader) -> SparseHeader:
        size = self.reader.size
        assert size is not None
        at = size - FOOTER_MARKER_FROM_END
        if at < SECTOR:
            raise CorruptImage(f"{self.where}: the grain directory is at the end, but the file has no footer")
        tail = await self.reader.read(at, FOOTER_MARKER_FROM_END)
        _, fsize, ftype = _MARKER.unpack_from(tail, 0)
        eos = _MARKER.unpack_from(tail, 2 * SECTOR)
        if (
            fsize != 0
            or ftype != MARKER_FOOTER
            or eos != (0, 0, MARKER_EOS)
            or tail[SECTOR : SECTOR + 4] != MAGIC
        ):
            raise CorruptImage(
                f"{self.where}: the grain directory is at the end, but the last three sectors are not "
                "a footer marker, a footer and an end-of-stream marker"
            )
        f = SparseHeader.from_bytes(tail[SECTOR : 2 * SECTOR])
        f.validate(f"{self.where} (footer)", self.settings)
        self._same_geometry(h, f)
        if f.gd_offset == GD_AT_END:
            raise CorruptImage(f"{self.where}: the footer also says the grain directory is at the end")
        self._footer_at = at
        return f

    def _check_rgd(self, h: SparseHeader) -> None:
        """qemu reads the redundant directory too (and fails when it is not there): so must it be."""
        size = self.reader.size
        if (
            h.flags & FLAG_RGD
            and size is not None
            and (h.rgd_offset < 1 or (h.rgd_offset * SECTOR + h.gd_entries * 4 > size))
        ):
            raise CorruptImage(
                f"{self.where}: the redundant grain directory at sector {h.rgd_offset} lies outside the "
                f"{size}-byte file"
            )

    def _same_geometry(self, h: SparseHeader, f: SparseHeader) -> None:
        if (h.capacity, h.granularity, h.num_gtes, h.compression) != (
            f.capacity,
            f.granularity,
            f.num_gtes,
            f.compression,
        ):
            raise CorruptImage(
                f"{self.where}: the footer's capacity, grain size or compression differ from the header's"
            )

    async def _directory(self, h: SparseHeader, footer: SparseHeader | None) -> None:
        r = self.reader
        size = r.size
        n = h.gd_entries
        gd_at = h.gd_offset * SECTOR
        if h.gd_offset < 1 or (size is not None and gd_at + n * 4 > size):
            raise CorruptImage(
                f"{self.where}: the grain directory ({n} entries at sector {h.gd_offset}) lies outside "
                f"the {size}-byte file"
            )
        self.gd = _le32(await r.read(gd_at, n * 4)) if n else array("I")
        self.gt_bytes = h.num_gtes * 4
        for t, sec in enumerate(self.gd):
            if sec and (sec < 1 or (size is not None and sec * SECTOR + self.gt_bytes > size)):
                raise CorruptImage(
                    f"{self.where}: grain directory entry {t} points to a grain table at sector {sec}, "
                    f"outside the {size}-byte file"
                )
        self._lead = SECTOR if h.markers else 0  # the marker sector before each table
        self._tail = [gd_at - self._lead]
        if footer is not None:
            self._tail.append(self._footer_at)
        if size is not None:
            self._tail.append(size)
        if not r.ranged:
            await self._all_tables()

    async def _all_tables(self) -> None:
        """Sequential reader: every grain table now, in file order (qemu writes them before the data)."""
        order = sorted((sec, t) for t, sec in enumerate(self.gd) if sec)
        need = len(order) * self.gt_bytes
        budget = max(self.settings.reorder_buffer, 1 * MiB)
        if need > budget:
            raise UnsupportedImage(
                f"{self.where}: its {len(order)} grain tables ({need // MiB} MiB) must be held to read "
                "the image in one pass; convert it from a range-capable source (a file, S3, or HTTP with "
                "Range support) or raise IMGPIPE_REORDER_BUFFER "
                f"(now {self.settings.reorder_buffer // MiB} MiB)"
            )
        for sec, t in order:
            self._tables[t] = _le32(await self.reader.read(sec * SECTOR, self.gt_bytes))

    async def _table(self, t: int) -> array[int]:
        """Grain table t (allocated); with ranges, read together with the tables that follow it in
        the file and in the directory."""
        got = self._tables.get(t)
        if got is not None:
            return got
        gd = self.gd
        first = gd[t]
        k = t + 1
        limit = max(1, TABLE_BATCH // self.gt_bytes)
        step = self.gt_bytes // SECTOR if self.gt_bytes % SECTOR == 0 else 0
        while step and k < len(gd) and k - t < limit and gd[k] == first + (k - t) * step:
            k += 1
        raw = await self.reader.read(first * SECTOR, (k - t) * self.gt_bytes)
        for i in range(t, k):
            off = (i - t) * self.gt_bytes
            self._tables[i] = _le32(raw[off : off + self.gt_bytes])
        return self._tables[t]

    async def pieces(self) -> AsyncIterator[Piece]:
        if self.walk:
            async for p in self._walk():
                yield p
            return
        h = self.active
        span = self.grain * h.num_gtes
        allocated = [t for t, sec in enumerate(self.gd) if sec and t * span < self.length]
        zero = GTE_ZERO if h.zero_grains else 0
        empty: set[int] = set()  # tables seen to hold no grain while looking ahead
        ahead_i, ahead = -1, None  # the next table after the current one that holds a grain
        for i, t in enumerate(allocated):
            if t in empty:
                continue
            table = await self._table(t)
            nxt = allocated[i + 1] if i + 1 < len(allocated) else None
            if h.compressed and ahead_i <= i:
                # A compressed grain ends where the next grain in the file starts: look in the next
                # table that has one. qemu allocates every table, most of them empty; bounding by an
                # empty one made the last grain of a table reach to the end of the file, and a forward
                # reader cannot come back for the grains in between.
                ahead_i, ahead = len(allocated), None
                for k in range(i + 1, len(allocated)):
                    cand = await self._table(allocated[k])
                    if len(cand) and max(cand) > zero:
                        ahead_i, ahead = k, cand
                        break
                    empty.add(allocated[k])
                    self._tables.pop(allocated[k], None)
            after = ahead if h.compressed else None
            for p in self._table_pieces(t, table, nxt, after):
                if p.codec and h.markers and self.reader.size is None and p.stored == self._most:
                    # Nothing known after this grain (the last one, from a stream of unknown length):
                    # its marker says how long it is.
                    (n,) = struct.unpack_from("<I", await self.reader.read(p.file - self.base, 12), 8)
                    p = Piece(
                        p.guest, p.length, p.file, min(p.stored, _sectors(GRAIN_MARKER_SIZE + n)), p.codec
                    )
                yield p
            del self._tables[t]

    def _bounds(self, t: int, table: array[int], nxt: int | None, after: array[int] | None) -> list[int]:
        """Sorted file offsets where something else starts: a compressed grain of table t ends at the
        next one. VMware writes each table (behind its marker) after its grains, qemu the grains of
        table t + 1 after those of t; the directory, footer and end of file come last."""
        zero = GTE_ZERO if self.active.zero_grains else 0
        starts = {e * SECTOR for e in table if e > zero}
        starts.update(e * SECTOR for e in after or () if e > zero)
        starts.add(self.gd[t] * SECTOR - self._lead)
        if nxt is not None:
            starts.add(self.gd[nxt] * SECTOR - self._lead)
        starts.update(self._tail)
        return sorted(starts)

    def _table_pieces(
        self, t: int, table: array[int], nxt: int | None, after: array[int] | None
    ) -> list[Piece]:
        h = self.active
        grain, vsize = self.grain, self.length
        size = self.reader.size
        first_sector = max(1, h.grain_offset)
        zero = GTE_ZERO if h.zero_grains else 0
        base = t * grain * h.num_gtes
        n = min(h.num_gtes, -(-(vsize - base) // grain))
        out: list[Piece] = []
        starts: list[int] = []
        most = 0  # qemu reads a compressed grain from at most this many bytes
        if h.compressed:
            starts = self._bounds(t, table, nxt, after)
            most = self._most
        run_g = run_f = run_n = 0
        for i in range(n):
            e = table[i]
            if e == 0 or e == zero:
                continue
            g = base + i * grain
            if e < first_sector or (size is not None and e * SECTOR >= size):
                raise CorruptImage(
                    f"{self.where}: the grain for guest offset {self.guest + g:#x} is at sector {e}, "
                    f"outside the grain area (sectors {first_sector}..{(size or 0) // SECTOR})"
                )
            length = min(grain, vsize - g)
            off = e * SECTOR
            if h.compressed:
                end = off + most
                j = bisect_right(starts, off)
                if j < len(starts):
                    end = min(end, starts[j])
                if run_n:
                    out.append(Piece(self.guest + run_g, run_n, self.base + run_f))
                    run_n = 0
                out.append(Piece(self.guest + g, length, self.base + off, end - off, self.codec))
                continue
            if size is not None and off + length > size:
                length = size - off  # qemu reads the missing tail of the last grain as zeros
            if run_n and run_g + run_n == g and run_f + run_n == off:
                run_n += length
                continue
            if run_n:
                out.append(Piece(self.guest + run_g, run_n, self.base + run_f))
            run_g, run_f, run_n = g, off, length
        if run_n:
            out.append(Piece(self.guest + run_g, run_n, self.base + run_f))
        return out

    async def _walk(self) -> AsyncIterator[Piece]:
        """A streamOptimized file from a sequential reader: grain markers in file order. The tables
        that follow (GT markers after their grains, the directory, the footer) are checked against
        the grains already passed, so the disk is the one a table-reading tool sees, or a refusal."""
        h = self.header
        r = self.reader
        size = r.size
        grain, vsize = self.grain, self.length
        pos = h.grain_offset * SECTOR
        if pos < SECTOR:
            raise CorruptImage(f"{self.where}: grains start at sector {h.grain_offset}, inside the header")
        check = _StreamCheck(self.where, h, self.settings)
        done = 0  # guest bytes before this are behind us
        footer: SparseHeader | None = None
        gs = h.granularity
        while True:
            if size is not None and pos + SECTOR > size:
                break  # no end-of-stream marker: the file simply ends
            val, msize, mtype = _MARKER.unpack(await r.read(pos, _MARKER.size))
            if msize:
                if val % gs or val * SECTOR >= vsize:
                    raise CorruptImage(
                        f"{self.where}: a grain marker at offset {pos} names sector {val}, not the start of "
                        f"a grain inside the {vsize}-byte disk"
                    )
                if msize > 2 * grain:
                    raise CorruptImage(
                        f"{self.where}: the grain at offset {pos} claims {msize} compressed bytes for a "
                        f"{grain}-byte grain"
                    )
                g = val * SECTOR
                if g < done:
                    raise UnsupportedImage(
                        f"{self.where}: the grain for guest offset {g:#x} comes after guest offset "
                        f"{done:#x} in the stream (grains out of order); convert it from a range-capable "
                        "source (a file, S3, or HTTP with Range support), which reads the grain tables"
                    )
                check.grain(pos // SECTOR, val // gs)
                stored = _sectors(GRAIN_MARKER_SIZE + msize)
                yield Piece(self.guest + g, min(grain, vsize - g), self.base + pos, stored, self.codec)
                done = g + grain
                pos += stored
                continue
            if mtype == MARKER_EOS:
                break
            if mtype == MARKER_GT:
                check.table(
                    pos // SECTOR + 1, val, await r.read(pos + SECTOR, min(val * SECTOR, check.gt_bytes))
                )
                pos += SECTOR + val * SECTOR
            elif mtype == MARKER_GD:
                check.directory(
                    pos // SECTOR + 1, val, await r.read(pos + SECTOR, min(val * SECTOR, check.gd_bytes))
                )
                pos += SECTOR + val * SECTOR
            elif mtype == MARKER_FOOTER:
                if val != 1:
                    raise CorruptImage(
                        f"{self.where}: a footer marker at offset {pos} says {val} sectors, not 1"
                    )
                footer = SparseHeader.from_bytes(await r.read(pos + SECTOR, SparseHeader.STRUCT.size))
                footer.validate(f"{self.where} (footer)", self.settings)
                self._same_geometry(h, footer)
                self._check_rgd(footer)
                if h.gd_offset == GD_AT_END and size is not None and pos != size - FOOTER_MARKER_FROM_END:
                    raise CorruptImage(
                        f"{self.where}: the footer is at offset {pos}, not in the last three sectors"
                    )
                pos += 2 * SECTOR
            else:
                raise CorruptImage(f"{self.where}: unknown marker type {mtype} at offset {pos}")
        if h.gd_offset == GD_AT_END and footer is None:
            raise CorruptImage(
                f"{self.where}: the grain directory is 'at the end', but the stream has no footer"
            )
        check.end(footer.gd_offset if footer is not None and h.gd_offset == GD_AT_END else h.gd_offset)


class _StreamCheck:
    """What the tables of a streamOptimized stream say, checked against the grains that went by.

    VMware writes each grain table right after its grains, so at most about one table's grains wait
    to be confirmed (bounded: a stream that holds back more is refused with the remedy)."""

    MAX_WAITING = 65536  # grains seen and not yet confirmed by a grain table

    def __init__(self, where: str, h: SparseHeader, settings: Settings) -> None:
        self.where = where
        self.h = h
        self.settings = settings
        self.gt_bytes = h.num_gtes * 4
        self.gd_bytes = h.gd_entries * 4
        self.zero = GTE_ZERO if h.zero_grains else 0
        self.waiting: dict[int, int] = {}  # marker sector -> grain index (guest LBA / grain)
        self.per_table: dict[int, int] = {}  # table index -> grains of it still waiting
        self.tables: dict[int, int] = {}  # grain table sector -> table index (-1: an empty table)
        self.gd_at: int | None = None

    def grain(self, sector: int, index: int) -> None:
        if len(self.waiting) >= self.MAX_WAITING:
            raise UnsupportedImage(
                f"{self.where}: over {self.MAX_WAITING} grains come before the grain tables that map them; "
                "convert it from a range-capable source (a file, S3, or HTTP with Range support)"
            )
        self.waiting[sector] = index
        t = index // self.h.num_gtes
        self.per_table[t] = self.per_table.get(t, 0) + 1

    def table(self, sector: int, sectors: int, raw: bytes) -> None:
        if len(raw) < self.gt_bytes:
            raise CorruptImage(
                f"{self.where}: a grain table marker at sector {sector - 1} says {sectors} sectors"
            )
        gtes = self.h.num_gtes
        t = -1
        for i, e in enumerate(_le32(raw)):
            if e == 0 or e == self.zero:
                continue
            index = self.waiting.pop(e, None)
            if index is None or index % gtes != i or (t >= 0 and index // gtes != t):
                raise CorruptImage(
                    f"{self.where}: the grain table at sector {sector} maps entry {i} to sector {e}, where "
                    "the stream has no grain for that place"
                )
            t = index // gtes
            self.per_table[t] -= 1
        if t >= 0 and self.per_table.pop(t):
            raise CorruptImage(
                f"{self.where}: the grain table at sector {sector} leaves out grains the stream holds for it"
            )
        self.tables[sector] = t

    def directory(self, sector: int, sectors: int, raw: bytes) -> None:
        if len(raw) < self.gd_bytes:
            raise CorruptImage(
                f"{self.where}: a grain directory marker at sector {sector - 1} says {sectors} sectors"
            )
        unnamed = {t for t in self.tables.values() if t >= 0}  # tables with grains, until named
        for t, e in enumerate(_le32(raw)):
            if e:
                held = self.tables.get(e)
                if held is None:
                    raise CorruptImage(
                        f"{self.where}: grain directory entry {t} names sector {e}, where the stream has "
                        "no grain table"
                    )
                if held not in (t, -1):
                    raise CorruptImage(
                        f"{self.where}: grain directory entry {t} names the grain table of entry {held}"
                    )
                unnamed.discard(t)
            elif t in unnamed:
                raise CorruptImage(
                    f"{self.where}: grain directory entry {t} is empty, but the stream holds a grain table "
                    "with grains for it"
                )
        self.gd_at = sector

    def end(self, gd_offset: int) -> None:
        if self.gd_at is None:
            raise CorruptImage(
                f"{self.where}: the stream ended without the grain directory its header promises"
            )
        if self.waiting:
            raise UnsupportedImage(
                f"{self.where}: {len(self.waiting)} grains of the stream are in no grain table it holds; "
                "convert it from a range-capable source (a file, S3, or HTTP with Range support)"
            )
        if gd_offset != self.gd_at:
            raise CorruptImage(
                f"{self.where}: the header says the grain directory is at sector {gd_offset}, the stream "
                f"has it at sector {self.gd_at}"
            )


# --------------------------------------------------------------------------------------------------
# The decoder


class VmdkDecoder(Decoder):
    format = "vmdk"

    async def open(self) -> ImageInfo:
        self.codecs: dict[str, int] = {}
        self.extents: list[_Extent] = []
        size = self.reader.size
        head = await self.reader.read(0, min(SECTOR, size) if size is not None else SECTOR)
        if head.startswith(MAGIC):
            return await self._open_sparse(head)
        if head.startswith(COWD_MAGIC):
            raise UnsupportedImage(f"vmdk: an ESX sparse extent (COWD, vmfsSparse): {_ESX_HINT}")
        if head.startswith(SESPARSE_MAGIC):
            raise UnsupportedImage(f"vmdk: an ESX seSparse extent: {_ESX_HINT}")
        return await self._open_descriptor()

    async def _open_sparse(self, head: bytes) -> ImageInfo:
        h = SparseHeader.from_bytes(head)
        h.validate("vmdk", self.settings)
        # The descriptor first: it sits before the tables, and a sequential reader only goes forward.
        check_parent(await self._embedded_descriptor(h), "vmdk")
        ext = _SparseExtent("vmdk", self.reader, 0, 0, self.settings, self.codecs)
        await ext.open(head)
        self.extents = [ext]
        sub = "streamOptimized" if h.compressed else "monolithicSparse"
        checks = [
            "descriptor at sector 1, under 1 MiB",
            "no parent (not a snapshot delta)",
            f"virtual size within the {self.settings.max_virtual_size / TiB:g} TiB cap",
            "grain directory and tables inside the file",
        ]
        self.info = ImageInfo(
            "vmdk",
            sub,
            ext.length,
            ext.grain,
            None,
            {
                "version": h.version,
                "compressed": h.compressed,
                "grain_markers": h.markers,
                "directory": "footer" if h.gd_offset == GD_AT_END else "header",
                "read_by": "grain markers" if ext.walk else "grain tables",
                "checks": checks,
            },
        )
        return self.info

    async def _embedded_descriptor(self, h: SparseHeader) -> Descriptor:
        size = self.reader.size
        want = h.desc_size * SECTOR  # at sector 1, under 1 MiB: SparseHeader.validate() says so
        if size is not None and SECTOR + want > size:
            raise CorruptImage(f"vmdk: the embedded descriptor runs past the end of the {size}-byte file")
        # qemu looks for the parent link in 10 KiB at sector 1 whatever the header says: so do we.
        want = max(want, QEMU_DESC_WINDOW)
        if size is not None:
            want = min(want, size - SECTOR)
        elif h.grain_offset:
            want = min(want, max(0, h.grain_offset - 1) * SECTOR)
        raw = await self.reader.read(SECTOR, want) if want > 0 else b""
        return parse_descriptor(raw)

    async def _open_descriptor(self) -> ImageInfo:
        size = self.reader.size
        if size is None:
            raise UnsafeImage(
                "vmdk: a descriptor file whose extents are separate files, from a stream: extents are "
                "only read as sibling objects of an S3 or HTTP(S) source"
            )
        if size >= MAX_DESCRIPTOR:
            raise CorruptImage(f"vmdk: a {size}-byte descriptor file (qemu reads descriptors under 1 MiB)")
        desc = parse_descriptor(await self.reader.read(0, size))
        check_parent(desc, "vmdk")
        ct = desc.create_type
        if desc.version and desc.version not in ("1", "2", "3"):
            raise UnsupportedImage(f"vmdk: descriptor version {desc.version!r} (only 1 to 3 exist)")
        if not ct:
            raise CorruptImage("vmdk: the descriptor has no createType")
        if ct.lower().startswith("vmfs") or ct == "seSparse":
            raise UnsupportedImage(f"vmdk: createType {ct!r} is {_ESX_HINT}")
        if ct in ("fullDevice", "partitionedDevice"):
            raise UnsafeImage(f"vmdk: createType {ct!r} maps a host's physical disk; refusing")
        if ct not in FLAT_TYPES and ct not in SPARSE_TYPES:
            raise UnsupportedImage(
                f"vmdk: createType {ct!r} is not one we convert (monolithicSparse, streamOptimized, "
                "monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat)"
            )
        if not desc.extents:
            raise CorruptImage(f"vmdk: the {ct} descriptor lists no extents")
        for e in desc.extents:
            if e.kind not in ("FLAT", "SPARSE", "ZERO"):
                raise UnsupportedImage(f"vmdk: extent type {e.kind} ({e.name!r}) is {_ESX_HINT}")
            if e.access == "NOACCESS":
                raise UnsupportedImage(f"vmdk: extent {e.name!r} is NOACCESS (its data is not readable)")
            if e.sectors <= 0:
                raise CorruptImage(f"vmdk: extent {e.name!r} has {e.sectors} sectors")
        for e in desc.extents:
            if e.kind != "ZERO" and not safe_extent_name(e.name):
                raise UnsafeImage(
                    f"vmdk: extent {e.name!r} is not a sibling file name; refusing to read a path, URL or "
                    "anything outside the descriptor's own folder"
                )
        total = sum(e.sectors for e in desc.extents) * SECTOR
        cap = self.settings.max_virtual_size
        if total > cap:
            raise UnsafeImage(
                f"vmdk: virtual size {total} is over the cap of {cap / TiB:g} TiB; "
                "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
            )
        # Open each extent file once, in order; they become one composite file for the pieces.
        names: list[str] = []
        readers: list[ImageReader] = []
        for e in desc.extents:
            if e.kind != "ZERO" and e.name not in names:
                names.append(e.name)
                readers.append(await self._sibling(e.name))
        composite = ExtentsReader(readers)
        guest = 0
        grain = 0
        for e in desc.extents:
            length = e.sectors * SECTOR
            if e.kind == "ZERO":
                self.extents.append(_Extent(guest, length))
            else:
                i = names.index(e.name)
                r = readers[i]
                assert r.size is not None
                if e.kind == "FLAT":
                    if (e.offset + e.sectors) * SECTOR > r.size:
                        raise CorruptImage(
                            f"vmdk: flat extent {e.name!r} has {r.size} bytes; the descriptor needs "
                            f"{(e.offset + e.sectors) * SECTOR}"
                        )
                    self.extents.append(_FlatExtent(guest, length, composite.bases[i] + e.offset * SECTOR))
                else:
                    where = f"vmdk: extent {e.name!r}"
                    sparse = _SparseExtent(where, r, composite.bases[i], guest, self.settings, self.codecs)
                    await sparse.open(await r.read(0, min(SECTOR, r.size)))
                    if sparse.length != length:
                        raise CorruptImage(
                            f"{where}: its header says {sparse.length // SECTOR} sectors, the descriptor "
                            f"{e.sectors}"
                        )
                    grain = max(grain, sparse.grain)
                    self.extents.append(sparse)
            guest += length
        self.reader = composite
        self.info = ImageInfo(
            "vmdk",
            ct,
            total,
            grain,
            None,
            {
                "extents": [f"{e.access} {e.sectors} {e.kind} {e.name}".rstrip() for e in desc.extents][:64],
                "checks": [
                    "every extent a sibling object of the descriptor",
                    "no parent (not a snapshot delta)",
                    f"virtual size within the {cap / TiB:g} TiB cap",
                ],
            },
        )
        return self.info

    async def _sibling(self, name: str) -> ImageReader:
        try:
            r = await self.reader.sibling(name)
        except SourceError as exc:
            if is_missing(exc):
                raise CorruptImage(
                    f"vmdk: extent {name!r} named by the descriptor is not beside it ({exc}); "
                    "upload every extent file next to the descriptor"
                ) from None
            raise
        except InputRefused as exc:  # a local file or a stream has no siblings: say which format asked
            raise type(exc)(f"vmdk: {exc}") from None
        if r.size is None or not r.ranged:
            raise UnsafeImage(f"vmdk: extent {name!r} must be readable with byte ranges")
        return r

    async def pieces(self) -> AsyncIterator[Piece]:
        for ext in self.extents:
            async for p in ext.pieces():
                yield p

    def decode(self, piece: Piece, stored: bytes | memoryview) -> bytes | memoryview:
        grain = self.codecs.get(piece.codec)
        if grain is None:
            return super().decode(piece, stored)
        data = memoryview(stored)
        if piece.codec.startswith("vmdk-marker"):
            if len(data) < GRAIN_MARKER_SIZE:
                raise CorruptImage(f"vmdk: the grain at guest {piece.guest:#x} is cut short")
            (n,) = struct.unpack_from("<I", data, 8)
            if n == 0 or n > 2 * grain:
                raise CorruptImage(
                    f"vmdk: the grain marker at guest {piece.guest:#x} claims {n} compressed bytes "
                    f"for a {grain}-byte grain"
                )
            # A size running into the next structure is read as far as that: the deflate stream ends
            # on its own, as qemu's inflate sees it; a stream cut short fails below.
            data = data[GRAIN_MARKER_SIZE : GRAIN_MARKER_SIZE + n]
        d = _inflate.decompressobj()
        try:
            out = d.decompress(data, grain + 1)
        except _INFLATE_ERRORS as exc:
            raise CorruptImage(
                f"vmdk: the compressed grain at guest {piece.guest:#x} is broken: {exc}"
            ) from None
        if len(out) > grain:
            raise CorruptImage(
                f"vmdk: the compressed grain at guest {piece.guest:#x} expands beyond its {grain}-byte grain"
            )
        if not d.eof or len(out) < piece.length:
            raise CorruptImage(
                f"vmdk: the compressed grain at guest {piece.guest:#x} is truncated: it expands to "
                f"{len(out)} bytes, the grain needs {piece.length}"
            )
        return memoryview(out)[: piece.length]


__all__ = ["ExtentsReader", "SparseHeader", "VmdkDecoder", "parse_descriptor", "safe_extent_name"]
