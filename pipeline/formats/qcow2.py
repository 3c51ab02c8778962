"""qcow2 input (docs/interop/qcow2.rst in qemu): v2 and v3, compressed (zlib, zstd), zero flags,
extended L2 entries (subclusters), any cluster size 512 B..2 MiB.

Only the active view is read: header -> L1 table -> each L2 table when the guest walk reaches it, so
a sequential source whose L2 tables sit among the data (as qemu writes them) works in one pass.
Refused: a backing file, an external data file, encryption, the corrupt bit, unknown incompatible
features, versions other than 2 and 3. The dirty bit is tolerated: the image is read as written.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import ModuleType

from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage
from pipeline.formats.layout import Decoder, ImageInfo, Piece
from pipeline.qcow2.header import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO, Qcow2Header
from pipeline.settings import MiB, TiB

_inflate: ModuleType
try:
    from zlib_ng import zlib_ng as _inflate
except ImportError:  # the stdlib is the fallback: same format, slower
    _inflate = zlib

# Incompatible feature bits (header offset 72).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# Header extensions (type, length) pairs after the header, up to the end of the first cluster.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_EXT_HEAD = struct.Struct(">II")

MAX_L1_BYTES = 32 * MiB  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * MiB  # QCOW_MAX_REFTABLE_SIZE
HEADER_READ = 4096  # header + extensions: qemu reads them from the first cluster
CODECS = {0: "zlib", 1: "zstd"}
_LITTLE = sys.byteorder == "little"


def _be64(raw: bytes) -> array[int]:
    table = array("Q", raw)
    if _LITTLE:
        table.byteswap()
    return table


@dataclass(frozen=True, slots=True)
class _Geometry:
    cs: int
    bits: int
    extended: bool
    entries: int  # L2 entries per table
    file_size: int | None

    def check_cluster(self, what: str, offset: int, length: int) -> None:
        """`what` at `offset`: cluster aligned, past the header cluster, inside the file."""
        if offset % self.cs:
            raise CorruptImage(f"qcow2: {what} at offset {offset:#x} is not aligned to a cluster")
        if offset < self.cs:
            raise CorruptImage(f"qcow2: {what} at offset {offset:#x} overlaps the header cluster")
        if self.file_size is not None and offset + length > self.file_size:
            raise CorruptImage(
                f"qcow2: {what} at offset {offset:#x} lies beyond the end of the {self.file_size}-byte file"
            )


class Qcow2Decoder(Decoder):
    format = "qcow2"

    async def open(self) -> ImageInfo:
        size = self.reader.size
        head = await self.reader.read(0, min(HEADER_READ, size) if size is not None else HEADER_READ)
        try:
            h = Qcow2Header.from_bytes(head)
        except ValueError as exc:
            raise CorruptImage(f"qcow2: {exc}") from None
        self._validate(h, size)
        self._extensions(h, head)
        self.header = h
        cs = 1 << h.cluster_bits
        ext = bool(h.incompatible_features & INCOMPAT_EXTL2)
        self.geo = _Geometry(cs, h.cluster_bits, ext, cs // (16 if ext else 8), size)
        self.codec = CODECS[h.compression_type]
        self.l1 = _be64(await self.reader.read(h.l1_table_offset, h.l1_size * 8)) if h.l1_size else array("Q")
        sub = {"version": h.version, "compat": "1.1" if h.version == 3 else "0.10"}
        if h.incompatible_features & INCOMPAT_DIRTY:
            sub["dirty"] = True
        self.info = ImageInfo(
            "qcow2",
            f"v{h.version}" + (" extended L2" if ext else ""),
            h.size,
            cs,
            None,
            {
                **sub,
                "compression_type": self.codec,
                "snapshots": h.nb_snapshots,
                "l1_entries_allocated": sum(1 for e in self.l1 if e & L1E_OFFSET_MASK),
                "checks": [
                    "no backing file",
                    "no external data file",
                    "not encrypted",
                    "no unknown incompatible features",
                    f"virtual size within the {self.settings.max_virtual_size / TiB:g} TiB cap",
                    "L1 and refcount tables aligned, inside the file, not overlapping",
                ],
            },
        )
        return self.info

    def _validate(self, h: Qcow2Header, file_size: int | None) -> None:
        if h.version not in (2, 3):
            raise UnsupportedImage(f"qcow2: version {h.version} (only 2 and 3 exist)")
        if not 9 <= h.cluster_bits <= 21:
            raise CorruptImage(f"qcow2: cluster_bits {h.cluster_bits} is outside 9..21")
        cs = 1 << h.cluster_bits
        if h.version == 3:
            if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
                raise CorruptImage(
                    f"qcow2: header length {h.header_length} (must be 104.. one cluster, a multiple of 8)"
                )
            if h.refcount_order > 6:
                raise CorruptImage(f"qcow2: refcount order {h.refcount_order} is above 6")
        if h.backing_file_offset or h.backing_file_size:
            raise UnsafeImage(
                "qcow2: the image has a backing file (it is a delta on top of another image); refusing: "
                "a backing file would be read from wherever it names; flatten it first (qemu-img convert)"
            )
        if h.crypt_method:
            kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, f"method {h.crypt_method}")
            raise UnsupportedImage(f"qcow2: the image is encrypted ({kind}); decrypt it first")
        inc = h.incompatible_features
        if inc & INCOMPAT_CORRUPT:
            raise CorruptImage("qcow2: the image is marked corrupt (its corrupt bit is set); repair it first")
        if inc & INCOMPAT_DATA_FILE:
            raise UnsafeImage(
                "qcow2: the image keeps its data in an external data file; refusing to read another file"
            )
        if inc & ~INCOMPAT_KNOWN:
            raise UnsupportedImage(f"qcow2: unknown incompatible feature bits {inc & ~INCOMPAT_KNOWN:#x}")
        if h.compression_type not in CODECS:
            raise UnsupportedImage(f"qcow2: unknown compression type {h.compression_type}")
        if bool(inc & INCOMPAT_COMPRESSION) != (h.compression_type != 0):
            raise CorruptImage("qcow2: compression type and its incompatible-feature bit disagree")
        if inc & INCOMPAT_EXTL2 and h.cluster_bits < 14:
            raise CorruptImage("qcow2: extended L2 entries need clusters of at least 16 KiB")
        cap = self.settings.max_virtual_size
        if h.size > cap:
            raise UnsafeImage(
                f"qcow2: virtual size {h.size} is over the cap of {cap / TiB:g} TiB; "
                "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
            )
        per_l2 = cs // (16 if inc & INCOMPAT_EXTL2 else 8)
        need = -(-h.size // (cs * per_l2))
        if h.l1_size < need:
            raise CorruptImage(f"qcow2: L1 table has {h.l1_size} entries, the disk needs {need}")
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(f"qcow2: L1 table of {h.l1_size} entries is over qemu's 32 MiB limit")
        if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise CorruptImage(f"qcow2: refcount table of {h.refcount_table_clusters} clusters is over 8 MiB")
        geo = _Geometry(cs, h.cluster_bits, False, 0, file_size)
        if h.l1_size:
            geo.check_cluster("the L1 table", h.l1_table_offset, h.l1_size * 8)
        geo.check_cluster("the refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)
        l1 = (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8)
        rt = (h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * cs)
        if h.l1_size and h.refcount_table_clusters and l1[0] < rt[1] and rt[0] < l1[1]:
            raise CorruptImage("qcow2: the L1 table and the refcount table overlap")
        self._tables = (l1, rt)

    def _extensions(self, h: Qcow2Header, head: bytes) -> None:
        if h.version < 3:
            return
        pos = h.header_length
        end = min(len(head), 1 << h.cluster_bits)
        while pos + 8 <= end:
            kind, length = _EXT_HEAD.unpack_from(head, pos)
            if kind == EXT_END:
                return
            if kind == EXT_DATA_FILE:
                raise UnsafeImage(
                    "qcow2: the image names an external data file; refusing to read another file"
                )
            if kind == EXT_CRYPTO:
                raise UnsupportedImage("qcow2: the image carries an encryption header; decrypt it first")
            pos += 8 + (length + 7) // 8 * 8
        if pos > end:
            raise CorruptImage("qcow2: a header extension runs past the end of the header cluster")

    def check_end(self, file_size: int) -> None:
        # A sequential source of unknown length learns the file size only now.
        for name, (_, end) in zip(("L1 table", "refcount table"), self._tables, strict=True):
            if end > file_size:
                raise CorruptImage(f"qcow2: the {name} lies beyond the end of the {file_size}-byte file")

    def _overlaps_tables(self, offset: int, length: int) -> bool:
        return any(a < offset + length and offset < b for a, b in self._tables)

    async def pieces(self) -> AsyncIterator[Piece]:
        geo = self.geo
        cs, entries = geo.cs, geo.entries
        vsize = self.header.size
        span = cs * entries
        for t, l1e in enumerate(self.l1):
            base = t * span
            if base >= vsize:
                break
            l2_off = l1e & L1E_OFFSET_MASK
            if not l2_off:
                continue  # unallocated: the whole range reads as zeros
            geo.check_cluster(f"L2 table {t}", l2_off, cs)
            if self._overlaps_tables(l2_off, cs):
                raise CorruptImage(f"qcow2: L2 table {t} at {l2_off:#x} overlaps the L1 or refcount table")
            raw = await self.reader.read(l2_off, cs)
            if raw.count(0) == len(raw):
                continue
            table = _be64(raw)
            n = min(entries, -(-(vsize - base) // cs))
            for piece in self._table_pieces(table, base, n):
                yield piece

    def _table_pieces(self, table: array[int], base: int, n: int) -> list[Piece]:
        geo = self.geo
        cs, bits = geo.cs, geo.bits
        vsize = self.header.size
        step = 2 if geo.extended else 1
        out: list[Piece] = []
        run_g = run_f = run_n = 0  # the pending plain run: guest, file, length
        csize_shift = 62 - (bits - 8)
        off_mask = (1 << csize_shift) - 1
        sec_mask = (1 << (bits - 8)) - 1
        file_size = geo.file_size
        for i in range(n):
            e = table[i * step]
            bitmap = table[i * step + 1] if step == 2 else 0
            if not e and not bitmap:
                continue
            g = base + i * cs
            length = min(cs, vsize - g)
            if e & OFLAG_COMPRESSED:
                if bitmap:
                    raise CorruptImage(f"qcow2: compressed cluster at guest {g:#x} has a subcluster bitmap")
                off = e & off_mask
                stored = ((e >> csize_shift) & sec_mask) * 512 + 512 - (off & 511)
                if off < cs or (file_size is not None and off >= file_size):
                    raise CorruptImage(f"qcow2: compressed cluster at guest {g:#x} points outside the file")
                if run_n:
                    out.append(Piece(run_g, run_n, run_f))
                    run_n = 0
                out.append(Piece(g, length, off, stored, self.codec))
                continue
            off = e & L2E_OFFSET_MASK
            if geo.extended:
                subs = self._subclusters(g, length, off, bitmap)
                if subs is None:  # the whole cluster is data
                    pass
                else:
                    if run_n:
                        out.append(Piece(run_g, run_n, run_f))
                        run_n = 0
                    out.extend(subs)
                    continue
            elif e & OFLAG_ZERO or not off:
                continue  # zero flag, or unallocated with no backing file: zeros
            geo.check_cluster(f"data cluster for guest {g:#x}", off, 0)
            if file_size is not None and off + length > file_size:
                # qemu leaves a cluster's zero tail unwritten at the end of the file and reads the
                # missing bytes as zeros; do the same.
                length = max(0, file_size - off)
                if not length:
                    continue
            if self._overlaps_tables(off, length):
                raise CorruptImage(f"qcow2: data cluster for guest {g:#x} overlaps the L1 or refcount table")
            if run_n and run_g + run_n == g and run_f + run_n == off:
                run_n += length
                continue
            if run_n:
                out.append(Piece(run_g, run_n, run_f))
            run_g, run_f, run_n = g, off, length
        if run_n:
            out.append(Piece(run_g, run_n, run_f))
        return out

    def _subclusters(self, g: int, length: int, off: int, bitmap: int) -> list[Piece] | None:
        """Pieces of one cluster with extended L2: None when every subcluster is allocated data."""
        alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
        if alloc & zero:
            raise CorruptImage(f"qcow2: cluster at guest {g:#x} marks subclusters both zero and allocated")
        if alloc and not off:
            raise CorruptImage(f"qcow2: cluster at guest {g:#x} has allocated subclusters but no offset")
        if not alloc:
            return []
        if alloc == 0xFFFFFFFF:
            return None
        sc = self.geo.cs // 32
        self.geo.check_cluster(f"data cluster for guest {g:#x}", off, 0)
        fsize = self.geo.file_size
        out: list[Piece] = []
        for k in range(32):
            if alloc >> k & 1 and k * sc < length:
                n = min(sc, length - k * sc)
                if fsize is not None:
                    n = min(n, fsize - (off + k * sc))  # bytes past the end read as zeros, as in qemu
                if n <= 0:
                    continue
                if out and out[-1].guest + out[-1].length == g + k * sc:
                    last = out.pop()
                    out.append(Piece(last.guest, last.length + n, last.file))
                else:
                    out.append(Piece(g + k * sc, n, off + k * sc))
        return out

    def decode(self, piece: Piece, stored: bytes | memoryview) -> bytes | memoryview:
        cs = self.geo.cs
        if piece.codec == "zlib":
            try:
                # qemu deflates with a 4 KiB window; a wider one decodes the same streams.
                data = _inflate.decompressobj(-15).decompress(stored, cs + 1)
            except (zlib.error, _inflate.error) as exc:
                raise CorruptImage(
                    f"qcow2: compressed cluster at guest {piece.guest:#x} is broken: {exc}"
                ) from None
        elif piece.codec == "zstd":
            import zstandard

            try:
                # A bounded streaming read: decompress() would trust a frame's declared content size
                # and allocate it (a 128 KiB cluster entry can declare gigabytes).
                with zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False) as r:
                    data = r.read(cs + 1)
            except zstandard.ZstdError as exc:
                raise CorruptImage(
                    f"qcow2: compressed cluster at guest {piece.guest:#x} is broken: {exc}"
                ) from None
        else:
            return super().decode(piece, stored)
        if len(data) != cs:
            raise CorruptImage(
                f"qcow2: compressed cluster at guest {piece.guest:#x} expands to {len(data)} bytes, "
                f"not the {cs}-byte cluster"
            )
        return memoryview(data)[: piece.length]
