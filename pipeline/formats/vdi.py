"""VDI input (VirtualBox Disk Image v1.1; qemu's block/vdi.c): dynamic and static images.

Layout: a 512-byte little-endian header (a "<<< ... >>>" text line, the signature 0xbeda107f at 0x40,
version 1.1, offsets of the block map and of the data, sizes), then the block map: one 32-bit entry
per 1 MiB guest block giving the index of its data block in the data area, 0xFFFFFFFF for a block
never written and 0xFFFFFFFE for a discarded one (both read as zeros). Data blocks are stored in
allocation order, which for an image a VM wrote is not guest order: pieces come in guest order and
the reader (ranged, or the sequential reorder window) fetches them where they are. The block map is
read lazily, a bounded slice at a time (from a sequential source, whole and up front).

Refused: undo and differencing images (a parent or link UUID), versions other than 1.1, block
sizes other than 1 MiB and sectors other than 512 bytes (qemu's limits), block-map entries beyond
the blocks the header declares, tables and blocks outside the file.
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

HEADER_SIZE = 512
PRE_HEADER = 0x48  # text, signature and version; the header's own size field counts what follows
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC, TYPE_STATIC, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
SECTOR = 512
BLOCK_SIZE = 1 * MiB  # the only block size qemu (and VirtualBox) reads
UNALLOCATED, DISCARDED = 0xFFFFFFFF, 0xFFFFFFFE  # both read as zeros
BLOCKS_MAX = (0x7FFFFFFF + 1 - SECTOR) // 4  # qemu: the block map is read in one int-sized request
DISK_SIZE_MAX = BLOCKS_MAX * BLOCK_SIZE
BMAP_SLICE = 1 * MiB  # with ranges, at most this much of the block map is held at once
# From a sequential source the whole map is read up front (it precedes the data; read lazily, its
# later slices would have to come back from the reorder window): up to this size, a 4 TiB disk.
SEQUENTIAL_BMAP_MAX = 16 * MiB
_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class VdiHeader:
    text: bytes
    signature: int
    version: int
    header_size: int
    image_type: int
    image_flags: int
    description: bytes
    offset_bmap: int
    offset_data: int
    cylinders: int
    heads: int
    sectors: int
    sector_size: int
    unused1: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: bytes
    uuid_last_snap: bytes
    uuid_link: bytes
    uuid_parent: bytes

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s")

    @classmethod
    def from_bytes(cls, raw: bytes) -> VdiHeader:
        return cls(*cls.STRUCT.unpack_from(raw))

    @property
    def guest_size(self) -> int:
        # VBoxManage convertfromraw can leave an odd size; qemu rounds it up to a whole sector.
        return -(-self.disk_size // SECTOR) * SECTOR

    def validate(self, file_size: int | None, cap: int) -> None:
        if self.signature != SIGNATURE:
            raise CorruptImage(f"vdi: signature {self.signature:#010x}, not {SIGNATURE:#010x}")
        if self.version != VERSION_1_1:
            raise UnsupportedImage(
                f"vdi: version {self.version >> 16}.{self.version & 0xFFFF} (only 1.1 is read)"
            )
        if (
            self.image_type in (TYPE_UNDO, TYPE_DIFF)
            or self.uuid_parent.strip(b"\0")
            or self.uuid_link.strip(b"\0")
        ):
            raise UnsupportedImage(
                "vdi: differencing or undo image (it holds only the changes to a parent disk); "
                "merge it into its parent first (VBoxManage clonemedium of the snapshot chain)"
            )
        if self.image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
            raise UnsupportedImage(f"vdi: unknown image type {self.image_type} (1 dynamic, 2 static)")
        if self.sector_size != SECTOR:
            raise UnsupportedImage(f"vdi: sector size {self.sector_size} (only 512 is read)")
        if self.block_size != BLOCK_SIZE:
            raise UnsupportedImage(
                f"vdi: block size {self.block_size} (only 1 MiB blocks are read, as in qemu)"
            )
        if self.offset_bmap % SECTOR or self.offset_data % SECTOR:
            raise CorruptImage(
                f"vdi: block map offset {self.offset_bmap:#x} or data offset {self.offset_data:#x} is not "
                "on a sector boundary"
            )
        if self.offset_bmap < HEADER_SIZE or PRE_HEADER + self.header_size > self.offset_bmap:
            raise CorruptImage(
                f"vdi: header size {self.header_size} runs into the block map at offset {self.offset_bmap:#x}"
            )
        if self.blocks_in_image > BLOCKS_MAX:
            raise CorruptImage(f"vdi: {self.blocks_in_image} blocks, over qemu's limit of {BLOCKS_MAX}")
        if self.disk_size > DISK_SIZE_MAX:
            raise UnsupportedImage(f"vdi: disk size {self.disk_size} is over qemu's limit of {DISK_SIZE_MAX}")
        if self.guest_size > cap:
            raise UnsafeImage(
                f"vdi: virtual size {self.guest_size} is over the cap of {cap / TiB:g} TiB; "
                "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
            )
        if self.disk_size > self.blocks_in_image * self.block_size:
            raise CorruptImage(
                f"vdi: disk size {self.disk_size} is more than the {self.blocks_in_image} blocks the "
                "header declares can hold"
            )
        bmap_end = self.offset_bmap + self.blocks_in_image * 4
        if bmap_end > self.offset_data:
            # VirtualBox's own check (qemu has none): it also bounds the map when the file size is unknown.
            raise CorruptImage(
                f"vdi: the block map at offset {self.offset_bmap:#x} ({self.blocks_in_image} entries) runs "
                f"into the data area at {self.offset_data:#x}"
            )
        if file_size is not None:
            if bmap_end > file_size:
                raise CorruptImage(
                    f"vdi: the block map at offset {self.offset_bmap:#x} ({self.blocks_in_image} "
                    f"entries) runs past the end of the {file_size}-byte file"
                )
            if self.offset_data > file_size:
                raise CorruptImage(
                    f"vdi: the data area at offset {self.offset_data:#x} starts past the end of the "
                    f"{file_size}-byte file"
                )


def _text(raw: bytes) -> str:
    """The header's text line, printable ASCII only (it comes from the image)."""
    line = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return "".join(c for c in line if c.isprintable()).strip()[:64]


class VdiDecoder(Decoder):
    format = "vdi"

    async def open(self) -> ImageInfo:
        size = self.reader.size
        if size is not None and size < HEADER_SIZE:
            raise CorruptImage(f"vdi: the file has {size} bytes, less than its 512-byte header")
        raw = await self.reader.read(0, HEADER_SIZE)
        h = VdiHeader.from_bytes(raw)
        h.validate(size, self.settings.max_virtual_size)
        self.header = h
        self.vsize = h.guest_size
        need = -(-self.vsize // h.block_size)
        self._whole: array[int] | None = None
        if not self.reader.ranged and need * 4 <= SEQUENTIAL_BMAP_MAX:
            self._whole = await self._read_map(0, need)
        static = h.image_type == TYPE_STATIC
        self.info = ImageInfo(
            "vdi",
            "static" if static else "dynamic",
            self.vsize,
            h.block_size,
            None,
            {
                "text": _text(h.text),
                "blocks_in_image": h.blocks_in_image,
                "blocks_allocated": h.blocks_allocated,
                "checks": [
                    "not a differencing or undo image (no parent disk)",
                    "version 1.1, 512-byte sectors, 1 MiB blocks",
                    f"virtual size within the {self.settings.max_virtual_size / TiB:g} TiB cap",
                    "block map inside the file, every entry within the declared blocks",
                ],
            },
        )
        return self.info

    async def _read_map(self, first: int, n: int) -> array[int]:
        """Block map entries [first, first + n), in slices so the bytes read are never held twice."""
        table: array[int] = array("I")
        for at in range(first, first + n, BMAP_SLICE // 4):
            k = min(BMAP_SLICE // 4, first + n - at)
            part = array("I", await self.reader.read(self.header.offset_bmap + at * 4, k * 4))
            if not _LITTLE:
                part.byteswap()
            table.extend(part)
        return table

    async def pieces(self) -> AsyncIterator[Piece]:
        h = self.header
        bs, vsize = h.block_size, self.vsize
        need = -(-vsize // bs)
        per_slice = BMAP_SLICE // 4
        file_size = self.reader.size
        for first in range(0, need, per_slice):
            n = min(per_slice, need - first)
            if self._whole is not None:
                table = self._whole[first : first + n]
            else:
                table = await self._read_map(first, n)
            if table.count(UNALLOCATED) + table.count(DISCARDED) == n:
                continue
            run_g = run_f = run_n = 0  # the pending run: guest, file, length
            for k, e in enumerate(table):
                if e >= DISCARDED:
                    continue
                i = first + k
                if e >= h.blocks_in_image:
                    raise CorruptImage(
                        f"vdi: block map entry {i} points to block {e}, beyond the {h.blocks_in_image} "
                        "blocks the header declares"
                    )
                g = i * bs
                off = h.offset_data + e * bs
                length = min(bs, vsize - g)
                if file_size is not None and off + length > file_size:
                    raise CorruptImage(
                        f"vdi: block map entry {i} points to data at offset {off:#x}, past the end of the "
                        f"{file_size}-byte file"
                    )
                if run_n and run_g + run_n == g and run_f + run_n == off:
                    run_n += length
                    continue
                if run_n:
                    yield Piece(run_g, run_n, run_f)
                run_g, run_f, run_n = g, off, length
            if run_n:
                yield Piece(run_g, run_n, run_f)
