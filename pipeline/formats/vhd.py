"""VHD input (Microsoft's Virtual Hard Disk v1, qemu's "vpc" driver, block/vpc.c): fixed and dynamic.

Layout: every image ends with a 512-byte footer ("conectix": size, geometry, disk type, checksum).
A fixed image is the guest disk followed by that footer. A dynamic image starts with a copy of the
footer, then a dynamic-disk header ("cxsparse") pointing at the block allocation table (BAT: one
big-endian sector number per block, 0xFFFFFFFF when unallocated); each allocated block is a sector
bitmap followed by the block's data. Like qemu, the bitmap is not consulted when reading a
dynamic image: an allocated block reads as stored. The BAT is read lazily, a bounded slice at a time
(from a sequential source, whole and up front: it precedes the data).

The virtual size follows qemu (10.0 and later): the footer's current size, except for images made by
Virtual PC ("vpc ") and older qemu ("qemu"), which are sized by their CHS geometry (unless the
geometry is the maximum 65535/16/255, which means "look at the current size"). Older qemu (7.2 here)
also sized unknown creators by CHS, which cut the end off Azure's disks (creator "wa" and two zero
bytes); both agree on every creator they know.

Refused: differencing images (they hold only the changes to a parent disk), a footer whose checksum
does not match, a block size that is not a power of two, tables or blocks outside the file.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage
from pipeline.formats.layout import Decoder, ImageInfo, Piece
from pipeline.settings import MiB, TiB

FOOTER_SIZE = 512
FOOTER_MAGIC = b"conectix"
DYN_HEADER_SIZE = 1024
DYN_MAGIC = b"cxsparse"
FOOTER_CHECKSUM_AT = 64  # the checksum field, taken as zero when summing

DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
UNALLOCATED = 0xFFFFFFFF
SECTOR = 512
VHD_MAX_SIZE = 0xFF000000 * SECTOR  # 2040 GiB: qemu's limit for dynamic images (32-bit sector numbers)
MAX_GEOMETRY = 65535 * 16 * 255  # "the disk is too large for CHS": the current size is the size
MAX_CURRENT_SIZE = 64 * TiB  # over Azure's 32 TiB fixed disks; the spec itself stops at 2040 GiB
CHS_SIZED_APPS = (b"vpc ", b"qemu")  # creators whose current size is not the guest size
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4  # qemu: the BAT must fit an int's worth of bytes
BAT_SLICE = 1 * MiB  # with ranges, at most this much of the BAT is held at once
# From a sequential source the whole BAT is read up front (it precedes the data; read lazily, its
# later slices would have to come back from the reorder window): up to this size.
SEQUENTIAL_BAT_MAX = 16 * MiB
_LITTLE = sys.byteorder == "little"


def _checksum(raw: bytes, at: int) -> int:
    """One's complement of the byte sum, the 4-byte checksum field at `at` counted as zero."""
    total = sum(raw) - sum(raw[at : at + 4])
    return ~total & 0xFFFFFFFF


def _app(app: bytes) -> str:
    return app.decode("latin-1").rstrip("\0 ") or "?"


@dataclass(frozen=True, slots=True)
class Footer:
    """The 512-byte hard disk footer (big-endian), at the end of every image and at 0 in dynamic ones."""

    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">8sIIQI4sI4sQQHBBII")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Footer:
        return cls(*cls.STRUCT.unpack_from(raw))

    def validate(self, raw: bytes, where: str) -> None:
        if self.cookie != FOOTER_MAGIC:
            raise CorruptImage(f"vhd: no footer ('conectix') {where}")
        computed = _checksum(raw[:FOOTER_SIZE], FOOTER_CHECKSUM_AT)
        if computed != self.checksum:
            raise CorruptImage(
                f"vhd: the footer {where} has checksum {self.checksum:#010x} but its bytes give "
                f"{computed:#010x}; the footer is damaged"
            )
        if self.disk_type == DISK_DIFFERENCING:
            raise UnsupportedImage(
                "vhd: differencing image (it has a parent disk and holds only the changes to it); "
                "merge it into its parent first (e.g. Hyper-V's Merge-VHD) and convert the result"
            )
        if self.current_size > MAX_CURRENT_SIZE:
            # Checked even when the geometry sizes the disk: a footer this wrong is not to be trusted.
            raise CorruptImage(
                f"vhd: the footer declares a virtual size (current size) of {self.current_size} bytes, "
                f"beyond any VHD ({MAX_CURRENT_SIZE // TiB} TiB)"
            )
        if self.disk_type not in (DISK_FIXED, DISK_DYNAMIC):
            raise CorruptImage(
                f"vhd: unknown disk type {self.disk_type} (2 fixed, 3 dynamic, 4 differencing)"
            )

    @property
    def chs_sized(self) -> bool:
        geometry = self.cylinders * self.heads * self.sectors
        return self.creator_app in CHS_SIZED_APPS and geometry != MAX_GEOMETRY

    @property
    def guest_size(self) -> int:
        """The virtual size, by qemu's rule (see the module docstring); whole sectors."""
        if self.chs_sized:
            return self.cylinders * self.heads * self.sectors * SECTOR
        return self.current_size // SECTOR * SECTOR


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """The dynamic-disk header ("cxsparse", 1024 bytes, big-endian) at the footer's data offset."""

    cookie: bytes
    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">8sQQIIII")

    @classmethod
    def from_bytes(cls, raw: bytes) -> DynamicHeader:
        return cls(*cls.STRUCT.unpack_from(raw))

    def validate(self, vsize: int, file_size: int | None) -> None:
        if self.cookie != DYN_MAGIC:
            raise CorruptImage(f"vhd: the dynamic disk header has cookie {self.cookie!r}, not b'cxsparse'")
        bs = self.block_size
        if bs < SECTOR or bs & (bs - 1):
            raise CorruptImage(f"vhd: block size {bs} is not a power of two of at least 512 bytes")
        if self.max_table_entries > MAX_TABLE_ENTRIES:
            raise CorruptImage(
                f"vhd: the BAT declares {self.max_table_entries} entries, over qemu's limit of "
                f"{MAX_TABLE_ENTRIES}"
            )
        need = -(-vsize // bs)
        if self.max_table_entries < need:
            raise CorruptImage(
                f"vhd: the BAT has {self.max_table_entries} entries of {bs} bytes, too few for the "
                f"{vsize}-byte disk ({need} needed)"
            )
        if file_size is not None and self.table_offset + need * 4 > file_size:
            raise CorruptImage(
                f"vhd: the BAT at offset {self.table_offset:#x} ({need * 4} bytes) runs past the end of "
                f"the {file_size}-byte file"
            )


def fixed_size(raw: bytes, file_size: int, cap: int | None) -> int:
    """The guest size of a fixed VHD whose last 512 bytes are `raw`; checks the footer."""
    footer = Footer.from_bytes(raw)
    footer.validate(raw, "at the end of the file")
    if footer.disk_type != DISK_FIXED:
        raise CorruptImage(
            "vhd: the footer at the end declares a dynamic disk, but the file does not start with "
            "its copy of the footer (truncated or damaged)"
        )
    vsize = footer.guest_size
    if cap is not None:
        _check_cap(vsize, cap)
    if vsize > file_size - FOOTER_SIZE:
        raise CorruptImage(
            f"vhd: the fixed disk declares {vsize} bytes but the file holds only "
            f"{file_size - FOOTER_SIZE} bytes before its footer (truncated?)"
        )
    return vsize


def _check_cap(vsize: int, cap: int) -> None:
    if vsize > cap:
        raise UnsafeImage(
            f"vhd: virtual size {vsize} is over the cap of {cap / TiB:g} TiB; "
            "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
        )


class VhdDecoder(Decoder):
    format = "vhd"

    @classmethod
    def trailing_footer(cls, tail: bytes, file_size: int) -> int | None:
        if len(tail) < FOOTER_SIZE or file_size < FOOTER_SIZE:
            return None
        raw = bytes(tail[-FOOTER_SIZE:])
        if not raw.startswith(FOOTER_MAGIC):
            return None
        # No cap here: the raw path caps the stream itself, and the guest is smaller than the file.
        return fixed_size(raw, file_size, None)

    async def open(self) -> ImageInfo:
        size = self.reader.size
        if size is not None and size < FOOTER_SIZE:
            raise CorruptImage(f"vhd: the file has {size} bytes, less than its 512-byte footer")
        head = await self.reader.read(0, FOOTER_SIZE)
        if head.startswith(FOOTER_MAGIC):
            return await self._open_dynamic(head)
        return await self._open_fixed()

    def _checks(self) -> list[str]:
        return [
            "footer checksum matches",
            "not a differencing image (no parent disk)",
            f"virtual size within the {self.settings.max_virtual_size / TiB:g} TiB cap",
        ]

    async def _open_fixed(self) -> ImageInfo:
        size = self.reader.size
        if size is None or not self.reader.ranged:
            # The stream path reads a fixed VHD as raw and trims the footer at EOF (stages.py).
            raise UnsupportedImage(
                "vhd: a fixed VHD (footer only at the end) is read here only from a range-capable source"
            )
        raw = await self.reader.read(size - FOOTER_SIZE, FOOTER_SIZE)
        vsize = fixed_size(raw, size, self.settings.max_virtual_size)
        footer = Footer.from_bytes(raw)
        self.vsize, self.fixed = vsize, True
        self.info = ImageInfo(
            "vhd",
            "fixed",
            vsize,
            0,
            vsize,
            {**self._details(footer), "checks": self._checks()},
        )
        return self.info

    def _details(self, footer: Footer) -> dict[str, object]:
        return {
            "creator": _app(footer.creator_app),
            "size_from": "CHS geometry" if footer.chs_sized else "current size",
            "geometry": f"{footer.cylinders}/{footer.heads}/{footer.sectors}",
        }

    async def _open_dynamic(self, head: bytes) -> ImageInfo:
        size = self.reader.size
        footer = Footer.from_bytes(head)
        footer.validate(head, "at offset 0")
        if footer.disk_type == DISK_FIXED:
            raise CorruptImage(
                "vhd: the footer copy at offset 0 declares a fixed disk; a fixed disk has its footer "
                "only at the end"
            )
        vsize = footer.guest_size
        _check_cap(vsize, self.settings.max_virtual_size)
        if vsize > VHD_MAX_SIZE:
            raise UnsupportedImage(f"vhd: virtual size {vsize} is over the format's 2040 GiB limit")
        off = footer.data_offset
        if off < FOOTER_SIZE or off % SECTOR or (size is not None and off + DYN_HEADER_SIZE > size):
            raise CorruptImage(
                f"vhd: the dynamic disk header offset {off:#x} is not a sector inside the file, "
                "after the footer"
            )
        raw = await self.reader.read(off, DYN_HEADER_SIZE)
        dyn = DynamicHeader.from_bytes(raw)
        dyn.validate(vsize, size)
        self.vsize, self.fixed, self.dyn = vsize, False, dyn
        need = -(-vsize // dyn.block_size)
        self._whole: array[int] | None = None
        if not self.reader.ranged and need * 4 <= SEQUENTIAL_BAT_MAX:
            self._whole = await self._read_bat(0, need)
        # qemu's formula, not the spec's: blocks under 4 KiB get no bitmap (the spec says one sector).
        self.bitmap_size = (dyn.block_size // (8 * SECTOR) + SECTOR - 1) // SECTOR * SECTOR
        self.info = ImageInfo(
            "vhd",
            "dynamic",
            vsize,
            dyn.block_size,
            None,
            {
                **self._details(footer),
                "bat_entries": dyn.max_table_entries,
                "checks": [
                    *self._checks(),
                    "block size a power of two",
                    "BAT and every allocated block inside the file",
                ],
            },
        )
        return self.info

    async def _read_bat(self, first: int, n: int) -> array[int]:
        """BAT entries [first, first + n), in slices so the bytes read are never held twice."""
        table: array[int] = array("I")
        for at in range(first, first + n, BAT_SLICE // 4):
            k = min(BAT_SLICE // 4, first + n - at)
            part = array("I", await self.reader.read(self.dyn.table_offset + at * 4, k * 4))
            if _LITTLE:
                part.byteswap()
            table.extend(part)
        return table

    async def pieces(self) -> AsyncIterator[Piece]:
        if self.fixed:
            if self.vsize:
                yield Piece(0, self.vsize, 0)
            return
        dyn = self.dyn
        bs, vsize = dyn.block_size, self.vsize
        need = -(-vsize // bs)
        per_slice = BAT_SLICE // 4
        file_size = self.reader.size
        skip = self.bitmap_size
        for first in range(0, need, per_slice):
            n = min(per_slice, need - first)
            if self._whole is not None:
                table = self._whole[first : first + n]
            else:
                table = await self._read_bat(first, n)
            if table.count(UNALLOCATED) == n:
                continue
            run_g = run_f = run_n = 0  # the pending run: guest, file, length
            for k, sector in enumerate(table):
                if sector == UNALLOCATED:
                    continue
                i = first + k
                g = i * bs
                start = sector * SECTOR
                data = start + skip
                if file_size is not None and data + bs > file_size:
                    raise CorruptImage(
                        f"vhd: BAT entry {i} points to a block at offset {start:#x} that runs past the "
                        f"end of the {file_size}-byte file"
                    )
                length = min(bs, vsize - g)
                if run_n and run_g + run_n == g and run_f + run_n == data:
                    run_n += length
                    continue
                if run_n:
                    yield Piece(run_g, run_n, run_f)
                run_g, run_f, run_n = g, data, length
            if run_n:
                yield Piece(run_g, run_n, run_f)


__all__ = ["VhdDecoder", "fixed_size"]
