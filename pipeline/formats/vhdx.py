"""VHDX input (Microsoft's MS-VHDX v1.0; qemu's block/vhdx.c): fixed and dynamic images, block sizes
1..256 MiB, logical sectors of 512 and 4096 bytes.

Layout: a 1 MiB header section (file identifier, two headers, two region tables), then regions anywhere
in the file: the log, the metadata region (block size, virtual size, sector sizes) and the BAT (one
64-bit entry per payload block, with a sector-bitmap entry after every `chunk_ratio` payload entries).
The BAT is read lazily, a bounded slice at a time (1 MiB; 8 MiB from a stream), as the guest walk
reaches it.

A log that still holds changes (an image not closed cleanly) is replayed in memory, as the spec asks of
a reader: its active sequence becomes an overlay of 4 KiB sectors over the file (at most the log's
size, itself at most 8 MiB) through which the tables and data are read; nothing is written.

Refused: differencing images (a parent disk), unknown required regions or metadata items, partially
present blocks (differencing only), unknown block states, a log over 8 MiB that holds a GUID.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

import google_crc32c

from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage
from pipeline.formats.layout import Decoder, ImageInfo, ImageReader, Piece
from pipeline.settings import KiB, MiB, TiB

# Header section: file identifier at 0, headers at 64 KiB and 128 KiB, region tables at 192 and 256 KiB.
FILE_ID = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_CRC_SPAN = 4 * KiB  # the header checksum covers the first 4 KiB of its 64 KiB block
REGION_TABLE_OFFSET = 192 * KiB  # qemu reads only the first copy; so do we
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
HEADER_SECTION = 1 * MiB
MAX_TABLE_ENTRIES = 2047  # region and metadata tables (the spec; qemu enforces it)
ALIGN = 1 * MiB  # regions, the log and payload blocks sit on 1 MiB boundaries
MAX_VHDX_SIZE = 64 * TiB
MIN_BLOCK, MAX_BLOCK = 1 * MiB, 256 * MiB
MAX_SECTORS_PER_BLOCK = 1 << 23  # chunk ratio = 2^23 * logical sector size / block size
BAT_SLICE = 1 * MiB  # at most this much of the BAT is held at once (a 128 GiB disk's with 1 MiB blocks)
# Forward only, a later slice is read back from the stream's reorder window, which keeps skipped
# bytes only for so long: larger slices there (a 1 TiB disk's BAT with 1 MiB blocks, 32 TiB with 32 MiB).
BAT_SLICE_STREAM = 8 * MiB
LOG_SECTOR = 4 * KiB
METADATA_SPAN = 1 * MiB  # the required metadata items are read in one go when this close together
MAX_LOG = 8 * MiB  # a log to replay is read whole (Hyper-V and qemu make 1 MiB logs)
LOG_CHECK_BUDGET = 16  # checksummed bytes of log entries, in multiples of the log's size


def _guid(text: str) -> bytes:
    """The on-disk bytes of a GUID: Microsoft's mixed-endian layout."""
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_DATA = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)

# Metadata items we understand: name and the bytes we read from each.
METADATA_ITEMS = {
    FILE_PARAMETERS: ("file parameters", 8),
    VIRTUAL_DISK_SIZE: ("virtual disk size", 8),
    PAGE_83_DATA: ("page 83 data", 16),
    LOGICAL_SECTOR_SIZE: ("logical sector size", 4),
    PHYSICAL_SECTOR_SIZE: ("physical sector size", 4),
    PARENT_LOCATOR: ("parent locator", 0),
}
REQUIRED_ITEMS = (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE_83_DATA, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE)
REGION_REQUIRED = 1  # region table entry flag
ITEM_REQUIRED = 4  # metadata entry flag (IsRequired)
PARAM_LEAVE_BLOCKS_ALLOCATED = 1  # a fixed image
PARAM_HAS_PARENT = 2  # a differencing image

# BAT entry: state in bits 0..2, file offset in MiB in bits 20..63.
STATE_MASK = 7
OFFSET_SHIFT = 20
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED_V095, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 5, 6, 7
ZERO_STATES = frozenset({NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED_V095, UNMAPPED})  # all read as zeros
_NOT_ZERO_STATE = bytes(0 if (b & STATE_MASK) in ZERO_STATES else 1 for b in range(256))
_ENTRY = struct.Struct("<Q")


def _crc_ok(buf: bytes, at: int = 4) -> bool:
    """CRC-32C of `buf` with its 4-byte checksum field at `at` taken as zero, against that field."""
    crc: int = google_crc32c.extend(google_crc32c.value(buf[:at]), b"\0\0\0\0")
    crc = google_crc32c.extend(crc, buf[at + 4 :])
    stored: int = struct.unpack_from("<I", buf, at)[0]
    return crc == stored


@dataclass(frozen=True, slots=True)
class Header:
    """One of the two headers (64 KiB and 128 KiB): the one with the higher sequence number wins."""

    signature: bytes
    checksum: int
    sequence: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sIQ16s16s16sHHIQ")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Header:
        return cls(*cls.STRUCT.unpack_from(raw))

    @staticmethod
    def usable(raw: bytes) -> bool:
        """What qemu calls a valid header: the checksum matches, the signature is "head", version 1."""
        h = Header.from_bytes(raw)
        return h.signature == b"head" and h.version == 1 and _crc_ok(raw)

    def validate(self, file_size: int | None) -> None:
        if self.log_version != 0:
            raise CorruptImage(f"vhdx: log version {self.log_version} (only version 0 exists)")
        if self.log_offset < HEADER_SECTION or self.log_offset % ALIGN:
            raise CorruptImage(
                f"vhdx: the log at offset {self.log_offset:#x} is not on a 1 MiB boundary after the "
                "header section"
            )
        if self.log_length % ALIGN:
            raise CorruptImage(f"vhdx: log length {self.log_length} is not a multiple of 1 MiB")
        if file_size is not None and self.log_offset + self.log_length > file_size:
            raise CorruptImage(
                f"vhdx: the log at {self.log_offset:#x} ({self.log_length} bytes) runs past the end "
                f"of the {file_size}-byte file"
            )


@dataclass(frozen=True, slots=True)
class RegionTableHeader:
    signature: bytes
    checksum: int
    entry_count: int
    reserved: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sIII")

    @classmethod
    def from_bytes(cls, raw: bytes) -> RegionTableHeader:
        return cls(*cls.STRUCT.unpack_from(raw))

    def validate(self, raw: bytes) -> None:
        if self.signature != b"regi":
            raise CorruptImage(f"vhdx: region table signature {self.signature!r} (expected b'regi')")
        if not _crc_ok(raw):
            raise CorruptImage("vhdx: the region table's checksum does not match its contents")
        if self.entry_count > MAX_TABLE_ENTRIES:
            raise CorruptImage(
                f"vhdx: the region table declares {self.entry_count} entries, over the limit of "
                f"{MAX_TABLE_ENTRIES}"
            )


@dataclass(frozen=True, slots=True)
class RegionEntry:
    guid: bytes
    file_offset: int
    length: int
    flags: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<16sQII")

    @classmethod
    def from_bytes(cls, raw: bytes, offset: int) -> RegionEntry:
        return cls(*cls.STRUCT.unpack_from(raw, offset))

    def validate(self, name: str, file_size: int | None) -> None:
        """A region we read (the BAT, the metadata): aligned, after the header section, inside the file."""
        if (
            self.file_offset < HEADER_SECTION
            or self.file_offset % ALIGN
            or not self.length
            or self.length % ALIGN
        ):
            raise CorruptImage(
                f"vhdx: the {name} at {self.file_offset:#x} ({self.length} bytes) is not made of "
                "whole 1 MiB units after the header section"
            )
        if file_size is not None and self.file_offset + self.length > file_size:
            raise CorruptImage(
                f"vhdx: the {name} at {self.file_offset:#x} ({self.length} bytes) runs past the end "
                f"of the {file_size}-byte file"
            )


@dataclass(frozen=True, slots=True)
class MetadataTableHeader:
    signature: bytes
    reserved: int
    entry_count: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<8sHH20x")

    @classmethod
    def from_bytes(cls, raw: bytes) -> MetadataTableHeader:
        return cls(*cls.STRUCT.unpack_from(raw))

    def validate(self) -> None:
        if self.signature != b"metadata":
            raise CorruptImage(f"vhdx: metadata table signature {self.signature!r} (expected b'metadata')")
        if self.entry_count > MAX_TABLE_ENTRIES:
            raise CorruptImage(
                f"vhdx: the metadata table declares {self.entry_count} entries, over the limit of "
                f"{MAX_TABLE_ENTRIES}"
            )


@dataclass(frozen=True, slots=True)
class MetadataEntry:
    item_id: bytes
    offset: int  # from the start of the metadata region
    length: int
    flags: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<16sIII4x")

    @classmethod
    def from_bytes(cls, raw: bytes, offset: int) -> MetadataEntry:
        return cls(*cls.STRUCT.unpack_from(raw, offset))

    def validate(self, name: str, need: int, region_length: int) -> None:
        if (
            self.length < need
            or self.offset < METADATA_TABLE_SIZE
            or self.offset + self.length > region_length
        ):
            raise CorruptImage(
                f"vhdx: the {name} metadata item ({self.length} bytes at {self.offset:#x}) lies outside "
                f"the {region_length}-byte metadata region or is too short"
            )


@dataclass(frozen=True, slots=True)
class LogEntryHeader:
    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence: int
    descriptor_count: int
    reserved: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sIIIQII16sQQ")

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview, offset: int) -> LogEntryHeader:
        return cls(*cls.STRUCT.unpack_from(raw, offset))


_LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")  # signature, trailing/reserved, leading/zero length, offset, seq


def _wrapped(log: bytes, pos: int, length: int) -> bytes:
    """`length` bytes of the circular log from `pos`, wrapping around its end."""
    out = log[pos : pos + length]
    return out + log[: length - len(out)] if len(out) < length else out


def _log_entry(log: bytes, pos: int, guid: bytes) -> LogEntryHeader | None:
    """The log entry at `pos` if its header and descriptors are valid (the checksum is the caller's)."""
    e = LogEntryHeader.from_bytes(log, pos)
    if e.signature != b"loge" or e.sequence == 0 or e.log_guid != guid:
        return None
    if not e.entry_length or e.entry_length % LOG_SECTOR or e.entry_length > len(log):
        return None
    desc_sectors = -(-(e.descriptor_count + 2) // 128)  # the header takes the room of two descriptors
    if desc_sectors * LOG_SECTOR > e.entry_length:
        return None
    entry = _wrapped(log, pos, e.entry_length)
    data = 0
    for k in range(e.descriptor_count):
        sig, _, length, offset, seq = _LOG_DESCRIPTOR.unpack_from(entry, 64 + 32 * k)
        if seq != e.sequence or offset % LOG_SECTOR:
            return None
        if sig == b"desc":
            data += 1
        elif sig != b"zero" or length % LOG_SECTOR:
            return None
    if (desc_sectors + data) * LOG_SECTOR > e.entry_length:
        return None
    return e


def _active_sequence(log: bytes, guid: bytes) -> list[tuple[int, LogEntryHeader]]:
    """The log's active sequence, oldest entry first, or [] when the log holds nothing to replay.

    A sequence is a chain of valid entries, each right after the previous one in the circular log
    with the next sequence number; the active one ends with the highest sequence number. Replay
    starts at the entry its head names as the tail (older entries are already in the file), or at
    the start of the chain when the tail is not in it (qemu writes such logs and replays them whole).
    """
    entries: dict[int, LogEntryHeader] = {}
    checked = 0
    for pos in range(0, len(log), LOG_SECTOR):
        if not log.startswith(b"loge", pos):
            continue
        e = _log_entry(log, pos, guid)
        if e is None:
            continue
        # Entries of a real log do not overlap, so checksumming them reads the log about once; a
        # crafted log of overlapping entries would make it quadratic.
        checked += e.entry_length
        if checked > LOG_CHECK_BUDGET * len(log):
            raise UnsupportedImage("vhdx: the log holds too many overlapping entries to check")
        if _crc_ok(_wrapped(log, pos, e.entry_length)):
            entries[pos] = e
    # Chains, newest first: an entry's successor has a higher sequence number, so it is done first.
    length: dict[int, int] = {}
    head: dict[int, int] = {}
    for pos, e in sorted(entries.items(), key=lambda pe: -pe[1].sequence):
        nxt = (pos + e.entry_length) % len(log)
        n = entries.get(nxt)
        if n is not None and n.sequence == e.sequence + 1:
            length[pos], head[pos] = length[nxt] + 1, head[nxt]
        else:
            length[pos], head[pos] = 1, pos
    if not entries:
        return []
    start = max(entries, key=lambda pos: (entries[head[pos]].sequence, length[pos]))
    chain = [(start, entries[start])]
    for _ in range(length[start] - 1):
        pos = (chain[-1][0] + chain[-1][1].entry_length) % len(log)
        chain.append((pos, entries[pos]))
    tail = chain[-1][1].tail
    for k, (pos, _) in enumerate(chain):
        if pos == tail:
            return chain[k:]
    return chain


class LogOverlay:
    """The file as it reads after the log's writes: 4 KiB sectors and zeroed ranges over the original."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self._written: dict[int, tuple[int, bytes]] = {}  # offset -> (write number, sector)
        self._zeroed: list[tuple[int, int, int]] = []  # (start, end, write number)
        self._sectors: dict[int, bytes] = {}
        self._keys: list[int] = []
        self._zeros: list[tuple[int, int]] = []
        self._zero_starts: list[int] = []
        self.writes = 0
        self.flushed = 0  # the file size the log says its writes were made against

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        self._written[offset] = (self.writes, data)

    def zero(self, offset: int, length: int) -> None:
        self.writes += 1
        if length:
            self._zeroed.append((offset, offset + length, self.writes))

    def finish(self) -> None:
        """Resolve the order of the writes: a sector survives unless a later zero range covers it.
        One sweep over both, sorted by offset, with a heap of the zero ranges open at each sector."""
        zeroed = sorted(self._zeroed)
        open_ranges: list[tuple[int, int]] = []  # (-write number, end)
        j = 0
        for k in sorted(self._written):
            n, data = self._written[k]
            while j < len(zeroed) and zeroed[j][0] <= k:
                heapq.heappush(open_ranges, (-zeroed[j][2], zeroed[j][1]))
                j += 1
            while open_ranges and open_ranges[0][1] <= k:
                heapq.heappop(open_ranges)
            if not open_ranges or -open_ranges[0][0] < n:
                self._sectors[k] = data
        self._keys = sorted(self._sectors)
        merged: list[tuple[int, int]] = []
        for a, b, _ in zeroed:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._zeros = merged
        self._zero_starts = [a for a, _ in merged]
        self._written.clear()
        self._zeroed.clear()

    def patch(self, offset: int, view: memoryview) -> None:
        """Apply the log's writes to `view`, which holds the original file's bytes from `offset`."""
        end = offset + len(view)
        i = max(0, bisect.bisect_right(self._zero_starts, offset) - 1)
        while i < len(self._zeros) and self._zeros[i][0] < end:
            a, b = max(self._zeros[i][0], offset), min(self._zeros[i][1], end)
            if a < b:
                view[a - offset : b - offset] = bytes(b - a)
            i += 1
        i = bisect.bisect_left(self._keys, offset - LOG_SECTOR + 1)
        while i < len(self._keys) and self._keys[i] < end:
            k = self._keys[i]
            data = self._sectors[k]
            a, b = max(k, offset), min(k + LOG_SECTOR, end)
            view[a - offset : b - offset] = data[a - k : b - k]
            i += 1


def _replay(log: bytes, sequence: list[tuple[int, LogEntryHeader]], file_size: int | None) -> LogOverlay:
    """The writes of the active sequence, in order, as an overlay over the file (nothing is written)."""
    overlay = LogOverlay(file_size)
    new_size = file_size or 0
    for pos, e in sequence:
        overlay.flushed = max(overlay.flushed, e.flushed_file_offset)
        if file_size is not None and e.flushed_file_offset > file_size:
            raise CorruptImage(
                f"vhdx: the log says the file had {e.flushed_file_offset} bytes, it has {file_size}: "
                "the image was truncated after its log was written"
            )
        limit = max(file_size or 0, -(-e.last_file_offset // ALIGN) * ALIGN)
        entry = _wrapped(log, pos, e.entry_length)
        data_at = -(-(e.descriptor_count + 2) // 128) * LOG_SECTOR
        for k in range(e.descriptor_count):
            desc = entry[64 + 32 * k : 96 + 32 * k]
            sig, _, length, offset, _ = _LOG_DESCRIPTOR.unpack(desc)
            if sig == b"zero":
                end = offset + length
            else:
                sector = entry[data_at : data_at + LOG_SECTOR]
                data_at += LOG_SECTOR
                seq = struct.unpack_from("<I", sector, 4)[0] << 32 | struct.unpack_from("<I", sector, 4092)[0]
                if not sector.startswith(b"data") or seq != e.sequence:
                    raise CorruptImage(
                        f"vhdx: log entry {e.sequence} has a data sector that does not belong to it"
                    )
                end = offset + LOG_SECTOR
            if end > limit and file_size is not None:
                raise CorruptImage(
                    f"vhdx: log entry {e.sequence} writes up to offset {end:#x}, past the {limit}-byte "
                    "file it describes"
                )
            if sig == b"zero":
                overlay.zero(offset, length)
            else:
                # The descriptor keeps the sector's first 8 and last 4 bytes (where the data sector
                # keeps its signature and sequence number).
                overlay.write(offset, desc[8:16] + sector[8:4092] + desc[4:8])
            new_size = max(new_size, end)
        new_size = max(new_size, limit)
    overlay.size = new_size if file_size is not None else None
    overlay.finish()
    return overlay


class ReplayedReader(ImageReader):
    """The image as it reads once its log is replayed: the original bytes, patched by the overlay.

    Bytes between the original end of the file and the replayed size read as zeros (a log may grow
    the file)."""

    def __init__(self, inner: ImageReader, overlay: LogOverlay) -> None:
        self.inner = inner
        self.overlay = overlay
        self.size = overlay.size
        self.ranged = inner.ranged
        self.reached = 0  # the end of the furthest read

    async def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        await self.read_into(offset, memoryview(out))
        return bytes(out)

    async def read_into(self, offset: int, view: memoryview) -> None:
        base = self.inner.size
        if self.size is not None and offset + len(view) > self.size:
            raise CorruptImage(
                f"vhdx: bytes {offset}-{offset + len(view) - 1} are needed but the file (with its log "
                f"replayed) has {self.size} bytes"
            )
        self.reached = max(self.reached, offset + len(view))
        n = len(view) if base is None else max(0, min(len(view), base - offset))
        if n:
            await self.inner.read_into(offset, view[:n])
        if n < len(view):
            view[n:] = bytes(len(view) - n)
        self.overlay.patch(offset, view)


class VhdxDecoder(Decoder):
    format = "vhdx"

    async def open(self) -> ImageInfo:
        size = self.reader.size
        if size is not None and size < HEADER_SECTION:
            raise CorruptImage(f"vhdx: the file has {size} bytes, less than its 1 MiB header section")
        # File identifier, both headers and the first region table: one read.
        head = await self.reader.read(0, REGION_TABLE_OFFSET + REGION_TABLE_SIZE)
        if not head.startswith(FILE_ID):
            raise CorruptImage("vhdx: the file identifier 'vhdxfile' is missing")
        h = self._header(head)
        h.validate(size)
        # Every region the payload blocks must stay clear of: (start, end, what).
        self.regions: list[tuple[int, int, str]] = [(0, HEADER_SECTION, "the header section")]
        if h.log_length:
            self.regions.append((h.log_offset, h.log_offset + h.log_length, "the log"))
        overlay = await self._log(h)
        if overlay is not None:
            # From here on every read sees the file as it is once the log is replayed.
            patched = bytearray(head)
            overlay.patch(0, memoryview(patched))
            if patched[:REGION_TABLE_OFFSET] != head[:REGION_TABLE_OFFSET]:
                # Headers have their own two-copy update and are never logged (qemu's replay of
                # such a log leaves a file it cannot open).
                raise CorruptImage("vhdx: the log rewrites the file identifier or the headers")
            head = bytes(patched)
            self.reader = ReplayedReader(self.reader, overlay)
            size = self.reader.size
        bat, meta = self._region_table(head[REGION_TABLE_OFFSET:], size)
        await self._metadata(meta)
        self.bat = bat
        bs, lss = self.block_size, self.logical_sector_size
        self.chunk_ratio = MAX_SECTORS_PER_BLOCK * lss // bs
        self.data_blocks = -(-self.virtual_size // bs)
        cr = self.chunk_ratio
        self.bat_entries = self.data_blocks + (self.data_blocks - 1) // cr if self.data_blocks else 0
        if self.bat_entries * 8 > bat.length:
            raise CorruptImage(
                f"vhdx: the BAT region holds {bat.length // 8} entries, the disk needs {self.bat_entries}"
            )
        fixed = bool(self.params & PARAM_LEAVE_BLOCKS_ALLOCATED)
        self.info = ImageInfo(
            "vhdx",
            "fixed" if fixed else "dynamic",
            self.virtual_size,
            bs,
            None,
            {
                "block_size": bs,
                "logical_sector_size": lss,
                "physical_sector_size": self.physical_sector_size,
                "chunk_ratio": cr,
                "bat_entries": self.bat_entries,
                "log_size": h.log_length,
                "log": "empty" if overlay is None else f"replayed in memory ({overlay.writes} writes)",
                "checks": [
                    "no parent disk (not differencing)",
                    "headers and region table checksums match",
                    "log empty, or its valid entries replayed in memory",
                    "no unknown required regions or metadata items",
                    f"virtual size within the {self.settings.max_virtual_size / TiB:g} TiB cap",
                    "BAT, metadata and log regions aligned, inside the file, not overlapping",
                    "payload blocks inside the file, clear of the tables",
                ],
            },
        )
        return self.info

    def _header(self, head: bytes) -> Header:
        raws = [head[off : off + HEADER_CRC_SPAN] for off in HEADER_OFFSETS]
        ok = [Header.usable(r) for r in raws]
        if not any(ok):
            raise CorruptImage(
                "vhdx: neither header is valid (bad signature, version or checksum in both copies)"
            )
        if ok[0] and ok[1]:
            h1, h2 = Header.from_bytes(raws[0]), Header.from_bytes(raws[1])
            if h1.sequence == h2.sequence and h1 != h2:
                raise CorruptImage("vhdx: the two headers differ but carry the same sequence number")
            return h2 if h2.sequence > h1.sequence else h1
        return Header.from_bytes(raws[0] if ok[0] else raws[1])

    async def _log(self, h: Header) -> LogOverlay | None:
        """The log's writes not yet in the file, replayed in memory (None: the log is empty)."""
        if h.log_guid == ZERO_GUID or not h.log_length:
            return None  # an empty log: what a clean close leaves
        if h.log_length > MAX_LOG:
            raise UnsupportedImage(
                f"vhdx: the log is {h.log_length // MiB} MiB, over the {MAX_LOG // MiB} MiB this version "
                "reads to replay changes the image may hold there; open and close the image with Hyper-V, "
                "or run `qemu-img check -r all` on a copy, then convert again"
            )
        log = await self.reader.read(h.log_offset, h.log_length)
        sequence = _active_sequence(log, h.log_guid)
        if not sequence:
            return None
        return _replay(log, sequence, self.reader.size)

    def _region_table(self, raw: bytes, size: int | None) -> tuple[RegionEntry, RegionEntry]:
        t = RegionTableHeader.from_bytes(raw)
        t.validate(raw)
        entries = [
            RegionEntry.from_bytes(raw, RegionTableHeader.STRUCT.size + k * RegionEntry.STRUCT.size)
            for k in range(t.entry_count)
        ]
        names = {BAT_GUID: "the BAT region", METADATA_GUID: "the metadata region"}
        spans = self.regions + [
            (
                e.file_offset,
                e.file_offset + e.length,
                names.get(e.guid, f"region {uuid.UUID(bytes_le=e.guid)}"),
            )
            for e in entries
        ]
        spans.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            if start < end:  # sorted by start: any overlap shows between neighbours
                raise CorruptImage(f"vhdx: {second} at {start:#x} overlaps {first}")
        self.regions = spans
        self._region_starts = [a for a, _, _ in spans]
        found: dict[bytes, RegionEntry] = {}
        for e in entries:
            if e.guid not in names:
                if e.flags & REGION_REQUIRED:
                    raise UnsupportedImage(
                        f"vhdx: the image requires region {uuid.UUID(bytes_le=e.guid)}, unknown to "
                        "this version"
                    )
                continue
            if e.guid in found:
                raise CorruptImage(f"vhdx: the region table lists {names[e.guid]} twice")
            e.validate(names[e.guid][4:], size)
            found[e.guid] = e
        for guid in (BAT_GUID, METADATA_GUID):
            if guid not in found:
                raise CorruptImage(f"vhdx: the region table has no {names[guid][4:]}")
        return found[BAT_GUID], found[METADATA_GUID]

    async def _metadata(self, region: RegionEntry) -> None:
        raw = await self.reader.read(region.file_offset, METADATA_TABLE_SIZE)
        t = MetadataTableHeader.from_bytes(raw)
        t.validate()
        items: dict[bytes, MetadataEntry] = {}
        for k in range(t.entry_count):
            e = MetadataEntry.from_bytes(raw, MetadataTableHeader.STRUCT.size + k * MetadataEntry.STRUCT.size)
            known = METADATA_ITEMS.get(e.item_id)
            if known is None:
                if e.flags & ITEM_REQUIRED:
                    raise UnsupportedImage(
                        f"vhdx: the image requires metadata item {uuid.UUID(bytes_le=e.item_id)}, unknown to "
                        "this version"
                    )
                continue
            if e.item_id in items:
                raise CorruptImage(f"vhdx: the metadata table lists the {known[0]} item twice")
            items[e.item_id] = e
        for guid in REQUIRED_ITEMS:
            if guid not in items:
                raise CorruptImage(f"vhdx: the metadata table has no {METADATA_ITEMS[guid][0]} item")
        for guid in REQUIRED_ITEMS:
            name, need = METADATA_ITEMS[guid]
            items[guid].validate(name, need, region.length)
        # The items sit together after the table: one read of their span, else one read each.
        lo = min(items[g].offset for g in REQUIRED_ITEMS)
        hi = max(items[g].offset + METADATA_ITEMS[g][1] for g in REQUIRED_ITEMS)
        values: dict[bytes, bytes] = {}
        if hi - lo <= METADATA_SPAN:
            span = await self.reader.read(region.file_offset + lo, hi - lo)
            for guid in REQUIRED_ITEMS:
                at = items[guid].offset - lo
                values[guid] = span[at : at + METADATA_ITEMS[guid][1]]
        else:
            for guid in sorted(REQUIRED_ITEMS, key=lambda g: items[g].offset):  # file order: streams
                values[guid] = await self.reader.read(
                    region.file_offset + items[guid].offset, METADATA_ITEMS[guid][1]
                )
        self.block_size, self.params = struct.unpack("<II", values[FILE_PARAMETERS])
        (self.virtual_size,) = struct.unpack("<Q", values[VIRTUAL_DISK_SIZE])
        (self.logical_sector_size,) = struct.unpack("<I", values[LOGICAL_SECTOR_SIZE])
        (self.physical_sector_size,) = struct.unpack("<I", values[PHYSICAL_SECTOR_SIZE])
        if self.params & PARAM_HAS_PARENT:
            raise UnsupportedImage(
                "vhdx: differencing image (it has a parent disk and holds only the changes made on top "
                "of it); merge it into its parent first (Hyper-V's Merge-VHD) and convert the result"
            )
        bs = self.block_size
        if not MIN_BLOCK <= bs <= MAX_BLOCK or bs & (bs - 1):
            raise CorruptImage(f"vhdx: block size {bs} is not a power of two from 1 MiB to 256 MiB")
        for what, value in (("logical", self.logical_sector_size), ("physical", self.physical_sector_size)):
            if value not in (512, 4096):
                raise CorruptImage(f"vhdx: {what} sector size {value} (only 512 and 4096 exist)")
        vsize = self.virtual_size
        if vsize % self.logical_sector_size:
            raise CorruptImage(
                f"vhdx: virtual size {vsize} is not a multiple of the {self.logical_sector_size}-byte "
                "logical sector"
            )
        cap = min(self.settings.max_virtual_size, MAX_VHDX_SIZE)
        if vsize > cap:
            raise UnsafeImage(
                f"vhdx: virtual size {vsize} is over the cap of {cap / TiB:g} TiB; "
                "raise IMGPIPE_MAX_VIRTUAL_SIZE if this is expected"
                if cap < MAX_VHDX_SIZE
                else f"vhdx: virtual size {vsize} is over the format's maximum of 64 TiB"
            )

    def _check_block(self, b: int, off: int, length: int) -> None:
        """Payload block `b` at `off`: after the header section, inside the file, clear of the tables."""
        size = self.reader.size
        if size is not None and off + length > size:
            raise CorruptImage(
                f"vhdx: BAT entry for block {b} points to offset {off:#x}, beyond the end of the "
                f"{size}-byte file"
            )
        # The regions are sorted and apart: only the last one starting before the block's end can overlap.
        i = bisect.bisect_left(self._region_starts, off + length) - 1
        if i >= 0 and self.regions[i][1] > off:
            what = self.regions[i][2]
            raise CorruptImage(f"vhdx: BAT entry for block {b} points to offset {off:#x}, inside {what}")

    async def pieces(self) -> AsyncIterator[Piece]:
        bs, cr, vsize = self.block_size, self.chunk_ratio, self.virtual_size
        group = cr + 1  # payload entries of one chunk, then its sector bitmap entry
        chunks = -(-self.data_blocks // cr)
        per_read = max(1, (BAT_SLICE if self.reader.ranged else BAT_SLICE_STREAM) // (group * 8))
        run_g = run_f = run_n = 0  # the pending plain run: guest, file, length
        for c0 in range(0, chunks, per_read):
            first = c0 * group
            last = min(self.bat_entries, (c0 + per_read) * group)
            raw = await self.reader.read(self.bat.file_offset + first * 8, (last - first) * 8)
            # The low byte of each little-endian entry holds its state: one byte per entry, 1 where
            # the state is not a zero state, so the walk visits only those (allocated) entries.
            flags = raw[::8].translate(_NOT_ZERO_STATE)
            j = flags.find(1)
            while j >= 0:
                c, k = divmod(first + j, group)
                e = _ENTRY.unpack_from(raw, 8 * j)[0]
                j = flags.find(1, j + 1)
                if k == cr:
                    # A sector bitmap entry: only differencing images use them; like qemu, refuse
                    # one marked present that points outside the file.
                    size = self.reader.size
                    if (
                        e & STATE_MASK == FULLY_PRESENT
                        and size is not None
                        and (e >> OFFSET_SHIFT << OFFSET_SHIFT) + MiB > size
                    ):
                        raise CorruptImage(
                            f"vhdx: the sector bitmap entry of chunk {c} points beyond the end of the file"
                        )
                    continue
                b = c * cr + k
                state = e & STATE_MASK
                if state != FULLY_PRESENT:
                    if state == PARTIALLY_PRESENT:
                        raise CorruptImage(
                            f"vhdx: block {b} is partially present, which only a differencing image may be"
                        )
                    raise CorruptImage(f"vhdx: BAT entry for block {b} has the unknown state {state}")
                g = b * bs
                off = (e >> OFFSET_SHIFT) << OFFSET_SHIFT
                length = min(bs, vsize - g)
                self._check_block(b, off, length)
                if run_n and run_g + run_n == g and run_f + run_n == off:
                    run_n += length
                    continue
                if run_n:
                    yield Piece(run_g, run_n, run_f)
                run_g, run_f, run_n = g, off, length
        if run_n:
            yield Piece(run_g, run_n, run_f)
        await self._check_flushed()

    async def _check_flushed(self) -> None:
        """A stream of unknown size: only now, past the data, see that the file is as long as the log
        says it was when its entries were written (open() checked it when the size is known)."""
        r = self.reader
        if not isinstance(r, ReplayedReader) or r.inner.size is not None or r.reached >= r.overlay.flushed:
            return
        try:
            await r.inner.read(r.overlay.flushed - 1, 1)
        except CorruptImage:
            raise CorruptImage(
                f"vhdx: the log says the file had {r.overlay.flushed} bytes, the stream ended before: "
                "the image was truncated after its log was written"
            ) from None
