"""VHDX input: dynamic and fixed, block sizes 1..256 MiB, 512- and 4096-byte logical sectors, the sector
bitmap interleave of the BAT, logs replayed in memory, from a file, HTTP (ranged and not), stdin and S3.

qemu-img builds each image from a raw disk with a known pattern and is the oracle (compare, check). What
qemu-img cannot make is made here by byte pokes with the checksums recomputed: 4096-byte logical sectors
(qemu-img has no option for them, and qemu 7.2 will not open them: the oracle is the 512-byte image the
test derives it from), logs holding changes (oracle: qemu's own replay, `qemu-img check -r all`, on a
copy), and every broken structure of the refusal cases.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
from servers import RangeHTTPServer, S3Store

from pipeline.formats.layout import ImageReader, Piece
from pipeline.formats.vhdx import VhdxDecoder
from pipeline.settings import Settings
from tests.helpers import (
    REAL_DATA,
    KiB,
    MiB,
    error_line,
    imgpipe,
    leftovers,
    pattern_disk,
    qemu_check,
    qemu_compare,
    summary_of,
)

GiB = 1024 * MiB
HEADERS = (64 * KiB, 128 * KiB)
REGION_TABLE = 192 * KiB
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
PAGE_83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746").bytes_le
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le
# Header fields: (offset in the header, struct format).
H_SIGNATURE = (0, "<4s")
H_SEQUENCE = (8, "<Q")
H_LOG_GUID = (48, "<16s")
H_LOG_LENGTH = (68, "<I")
H_LOG_OFFSET = (72, "<Q")


def vhdx(raw: Path, out: Path, *opts: str) -> Path:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vhdx", *opts, str(raw), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def as_raw(img: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True, capture_output=True)
    return out


class Vhdx:
    """A VHDX file's bytes, to poke at its structures and save with the checksums recomputed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buf = bytearray(path.read_bytes())

    def regions(self) -> dict[bytes, tuple[int, int, int]]:
        """guid -> (where its entry is, file offset, length)."""
        (count,) = struct.unpack_from("<I", self.buf, REGION_TABLE + 8)
        out = {}
        for k in range(count):
            at = REGION_TABLE + 16 + 32 * k
            guid, off, length = struct.unpack_from("<16sQI", self.buf, at)
            out[guid] = (at, off, length)
        return out

    @property
    def bat(self) -> int:
        return self.regions()[BAT_GUID][1]

    @property
    def metadata(self) -> int:
        return self.regions()[METADATA_GUID][1]

    def item_entry(self, guid: bytes) -> int:
        """Where the metadata table entry of item `guid` is."""
        (count,) = struct.unpack_from("<H", self.buf, self.metadata + 10)
        for k in range(count):
            at = self.metadata + 32 + 32 * k
            if self.buf[at : at + 16] == guid:
                return at
        raise KeyError(guid)

    def item(self, guid: bytes) -> int:
        """Where the data of metadata item `guid` is."""
        return self.metadata + struct.unpack_from("<I", self.buf, self.item_entry(guid) + 16)[0]

    def poke(self, offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, self.buf, offset, *values)

    def poke_headers(self, field: tuple[int, str], value: object) -> None:
        for h in HEADERS:
            self.poke(h + field[0], field[1], value)

    def save(self, fix: bool = True) -> Path:
        if fix:
            for start, length in ((HEADERS[0], 4 * KiB), (HEADERS[1], 4 * KiB), (REGION_TABLE, 64 * KiB)):
                self.poke(start + 4, "<I", 0)
                self.poke(start + 4, "<I", google_crc32c.value(bytes(self.buf[start : start + length])))
        self.path.write_bytes(self.buf)
        return self.path


def convert_ok(
    src: Path | str, dst: Path, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> dict[str, Any]:
    s = summary_of(imgpipe("convert", str(src), str(dst), "--json", env=env, stdin=stdin))
    qemu_check(dst)
    return s


# ---------------------------------------------------------------- subformats


VARIANTS = {
    "dynamic-1M": ("-o", "subformat=dynamic,block_size=1M"),
    "dynamic-8M": ("-o", "subformat=dynamic,block_size=8M"),
    "dynamic-32M": ("-o", "subformat=dynamic,block_size=32M,log_size=2M"),
    "dynamic-256M": ("-o", "subformat=dynamic,block_size=256M"),
    "fixed-1M": ("-o", "subformat=fixed,block_size=1M"),
    "fixed-default": ("-o", "subformat=fixed"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vhdx_variants_from_file(tmp_path: Path, variant: str) -> None:
    size = 13 * MiB + 3 * 512  # odd: the last block is partial
    raw = pattern_disk(tmp_path / "disk.raw", size, seed=len(variant))
    img = vhdx(raw, tmp_path / "in.vhdx", *VARIANTS[variant])
    s = convert_ok(img, tmp_path / "out.qcow2")
    assert (s["source_format"], s["virtual_size"]) == ("vhdx", size)
    qemu_compare(raw, tmp_path / "out.qcow2")


def test_written_discarded_and_zeroed_blocks(tmp_path: Path) -> None:
    """An image changed after creation: blocks written out of order (file order != guest order), zeroed
    ranges, and never-written blocks (NOT_PRESENT / ZERO states)."""
    img = tmp_path / "in.vhdx"
    subprocess.run(
        ["qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", str(img), str(9 * MiB + 512)],
        check=True,
        capture_output=True,
    )
    cmds = ["write -P 0x5a 7M 1M", "write -P 0x11 1M 300k", "write -P 0x22 9M 512", "write -z 1M 64k"]
    cmds += ["write -P 0x33 0 4k", "write -P 0x44 3584k 1M"]  # straddles two blocks
    for cmd in cmds:
        subprocess.run(["qemu-io", "-f", "vhdx", "-c", cmd, str(img)], check=True, capture_output=True)
    expected = as_raw(img, tmp_path / "expected.raw")
    convert_ok(img, tmp_path / "out.qcow2")
    qemu_compare(expected, tmp_path / "out.qcow2")
    # Sequentially too: the blocks are out of guest order in the file, within the reorder window.
    (tmp_path / "out.qcow2").unlink()
    convert_ok("-", tmp_path / "out.qcow2", stdin=img.read_bytes())
    qemu_compare(expected, tmp_path / "out.qcow2")


def _sparse_33g(tmp_path: Path) -> tuple[Path, int]:
    """A 33 GiB dynamic image with 1 MiB blocks: with 512-byte sectors a sector bitmap entry follows
    every 4096 payload entries (4 GiB), so data at 4 GiB and 32 GiB sits after bitmap entries."""
    size = 33 * GiB + 12 * KiB
    img = tmp_path / "big.vhdx"
    subprocess.run(
        ["qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", str(img), str(size)],
        check=True,
        capture_output=True,
    )
    cmds = ["write -P 0x11 0 1M", "write -P 0x22 4G 64k", f"write -P 0x33 {4 * GiB + 5 * MiB} 1M"]
    cmds += [f"write -P 0x44 {32 * GiB + MiB} 512k", f"write -P 0x55 {33 * GiB} 12k"]
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "vhdx", *args, str(img)], check=True, capture_output=True)
    return img, size


def test_sector_bitmap_interleave_with_512_and_4096_byte_sectors(tmp_path: Path) -> None:
    img, size = _sparse_33g(tmp_path)
    s = convert_ok(img, tmp_path / "out.qcow2")
    assert s["virtual_size"] == size
    qemu_compare(img, tmp_path / "out.qcow2")
    # The same disk with 4096-byte logical sectors: the chunk ratio grows 8x (a bitmap entry after every
    # 32768 payload entries), so the BAT is laid out anew: payload b at b + b // 32768, not b + b // 4096.
    v = Vhdx(img)
    blocks = -(-size // MiB)
    old = struct.unpack_from(f"<{blocks + (blocks - 1) // 4096}Q", v.buf, v.bat)
    new = [0] * (blocks + (blocks - 1) // 32768)
    for b in range(blocks):
        new[b + b // 32768] = old[b + b // 4096]
    struct.pack_into(f"<{len(new)}Q", v.buf, v.bat, *new)
    struct.pack_into(f"<{len(old) - len(new)}Q", v.buf, v.bat + 8 * len(new), *([0] * (len(old) - len(new))))
    v.poke(v.item(LOGICAL_SECTOR), "<I", 4096)
    v.path = img4k = tmp_path / "big4k.vhdx"
    v.save()
    d = summary_of(imgpipe("info", str(img4k), "--json"))
    assert d["details"]["logical_sector_size"] == 4096
    assert d["details"]["chunk_ratio"] == 32768
    (tmp_path / "out.qcow2").unlink()
    convert_ok(img4k, tmp_path / "out.qcow2")
    qemu_compare(img, tmp_path / "out.qcow2")  # the 512-byte image holds the same guest bytes


class FileReader(ImageReader):
    """The smallest ranged reader: os.pread on a local file, recording every read."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.ranged = True
        self.reads: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        data = os.pread(self.fd, length, offset)
        assert len(data) == length
        return data

    async def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = await self.read(offset, len(view))


def test_bat_read_in_slices_as_the_walk_goes(tmp_path: Path) -> None:
    """A 130 GiB disk with 1 MiB blocks has a 1 MiB+ BAT: it is read in two slices, the second when
    the walk reaches it, and blocks behind either slice map to the right bytes."""
    img = tmp_path / "big.vhdx"
    subprocess.run(
        ["qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", str(img), "130G"],
        check=True,
        capture_output=True,
    )
    cmds = ["write -P 1 0 64k", f"write -P 2 {129 * GiB} 1M", f"write -P 3 {129 * GiB + 4 * MiB} 1M"]
    subprocess.run(
        ["qemu-io", "-f", "vhdx", *[a for c in cmds for a in ("-c", c)], str(img)],
        check=True,
        capture_output=True,
    )

    async def walk() -> tuple[list[Piece], FileReader, int]:
        reader = FileReader(img)
        decoder = VhdxDecoder(reader, Settings())
        await decoder.open()
        opened = len(reader.reads)
        return [p async for p in decoder.pieces()], reader, opened

    pieces, reader, opened = asyncio.run(walk())
    assert [(p.guest, p.length) for p in pieces] == [(0, MiB), (129 * GiB, MiB), (129 * GiB + 4 * MiB, MiB)]
    data = img.read_bytes()
    assert data[pieces[0].file : pieces[0].file + 64 * KiB] == b"\1" * 64 * KiB
    assert data[pieces[1].file : pieces[1].file + MiB] == b"\2" * MiB
    assert data[pieces[2].file : pieces[2].file + MiB] == b"\3" * MiB
    bat = Vhdx(img).bat
    slices = [r for r in reader.reads[opened:] if bat <= r[0] < bat + 2 * MiB]
    assert len(slices) == 2, reader.reads
    assert max(n for _, n in slices) <= MiB


# ---------------------------------------------------------------- remote sources


def test_http_ranged_and_sequential(tmp_path: Path, http: RangeHTTPServer) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 20 * MiB + 1024, seed=11)
    img = vhdx(raw, tmp_path / "www" / "in.vhdx", "-o", "subformat=fixed,block_size=2M")
    s = convert_ok(http.url("/in.vhdx"), tmp_path / "out.qcow2")
    qemu_compare(raw, tmp_path / "out.qcow2")
    gets = [r for r in http.log if r.method == "GET"]
    assert all(r.range for r in gets)
    assert s["source_bytes_fetched"] <= img.stat().st_size * 1.05 + 64 * KiB
    assert len(gets) < 40, len(gets)  # a fixed image's blocks are contiguous: coalesced reads
    (tmp_path / "out.qcow2").unlink()
    convert_ok(http.url("/norange/in.vhdx"), tmp_path / "out.qcow2")
    qemu_compare(raw, tmp_path / "out.qcow2")


def test_s3_source(tmp_path: Path, store: S3Store, bucket: str) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 11 * MiB + 512, seed=5)
    img = vhdx(raw, tmp_path / "in.vhdx", "-o", "subformat=dynamic,block_size=1M")
    store.client().upload_file(str(img), bucket, "in.vhdx")
    s = convert_ok(f"s3://{bucket}/in.vhdx", tmp_path / "out.qcow2", env=store.env())
    assert s["source_bytes_fetched"] <= img.stat().st_size * 1.05 + 64 * KiB
    qemu_compare(raw, tmp_path / "out.qcow2")


# ---------------------------------------------------------------- the log


def log_entry(seq: int, guid: bytes, tail: int, writes: list[tuple[int, bytes | int]], size: int) -> bytes:
    """A log entry: data sectors (4096 bytes) or zeroed ranges (a length) at file offsets."""
    descs, data = [], []
    for off, what in writes:
        if isinstance(what, int):
            descs.append(struct.pack("<4sIQQQ", b"zero", 0, what, off, seq))
        else:
            descs.append(struct.pack("<4s4s8sQQ", b"desc", what[4092:], what[:8], off, seq))
            data.append(
                b"data" + struct.pack("<I", seq >> 32) + what[8:4092] + struct.pack("<I", seq & 0xFFFFFFFF)
            )
    desc_sectors = -(-(len(descs) + 2) // 128)
    length = (desc_sectors + len(data)) * 4096
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, tail, seq, len(descs), 0, guid, size, size)
    entry = bytearray((head + b"".join(descs)).ljust(desc_sectors * 4096, b"\0") + b"".join(data))
    struct.pack_into("<I", entry, 4, google_crc32c.value(bytes(entry)))
    return bytes(entry)


def _with_log(tmp_path: Path, entries: Callable[[Vhdx, bytes, int], list[tuple[int, bytes]]]) -> Path:
    """A qemu-made 8 MiB dynamic image (every 1 MiB block present) given a log: (log position, entry)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(range(1, 256)) * (8 * MiB // 255) + bytes(8 * MiB % 255))  # every block holds data
    img = vhdx(raw, tmp_path / "in.vhdx", "-o", "subformat=dynamic,block_size=1M")
    v = Vhdx(img)
    guid = uuid.uuid4().bytes
    log_at = struct.unpack_from("<Q", v.buf, HEADERS[0] + H_LOG_OFFSET[0])[0]
    for pos, entry in entries(v, guid, len(v.buf)):
        v.buf[log_at + pos : log_at + pos + len(entry)] = entry
    v.poke_headers(H_LOG_GUID, guid)
    return v.save()


def _block(v: Vhdx, b: int) -> int:
    return (struct.unpack_from("<Q", v.buf, v.bat + 8 * b)[0] >> 20) << 20


def test_log_replayed_in_memory_like_qemu(tmp_path: Path) -> None:
    def entries(v: Vhdx, guid: bytes, size: int) -> list[tuple[int, bytes]]:
        bat_sector = bytearray(v.buf[v.bat : v.bat + 4096])
        struct.pack_into("<Q", bat_sector, 8 * 3, 0)  # block 3 becomes NOT_PRESENT: zeros
        e10 = log_entry(
            10, guid, 0, [(_block(v, 1) + 4096, b"\xab" * 4096), (_block(v, 2) + 64 * KiB, 8192)], size
        )
        e11 = log_entry(
            11, guid, 0, [(v.bat, bytes(bat_sector)), (_block(v, 1) + 4096, b"\xcd" * 4096)], size
        )
        stale = log_entry(7, guid, 512 * KiB, [(_block(v, 0), b"\xee" * 4096)], size)  # an older sequence
        return [(0, e10), (len(e10), e11), (512 * KiB, stale)]

    img = _with_log(tmp_path, entries)
    assert subprocess.run(["qemu-img", "info", str(img)], capture_output=True).returncode != 0
    oracle = tmp_path / "replayed.vhdx"
    shutil.copy(img, oracle)
    subprocess.run(["qemu-img", "check", "-r", "all", str(oracle)], check=True, capture_output=True)
    expected = as_raw(oracle, tmp_path / "expected.raw")
    convert_ok(img, tmp_path / "out.qcow2")
    qemu_compare(expected, tmp_path / "out.qcow2")
    data = expected.read_bytes()
    assert data[MiB + 4096 : MiB + 8192] == b"\xcd" * 4096  # the later write of the two
    assert data[3 * MiB : 4 * MiB] == bytes(MiB)  # unmapped by the logged BAT sector
    (tmp_path / "out.qcow2").unlink()
    convert_ok("-", tmp_path / "out.qcow2", stdin=img.read_bytes())  # the log is read in stream order
    qemu_compare(expected, tmp_path / "out.qcow2")
    d = summary_of(imgpipe("info", str(img), "--json"))
    assert d["details"]["log"] == "replayed in memory (4 writes)"


def test_log_entry_wrapping_around_the_end_of_the_log(tmp_path: Path) -> None:
    """The log is circular: an entry that starts in its last sector continues at its start."""

    def entries(v: Vhdx, guid: bytes, size: int) -> list[tuple[int, bytes]]:
        log_size = struct.unpack_from("<I", v.buf, HEADERS[0] + H_LOG_LENGTH[0])[0]
        e = log_entry(5, guid, log_size - 4096, [(_block(v, 4) + 8192, b"\x77" * 4096)], size)
        return [(log_size - 4096, e[:4096]), (0, e[4096:])]

    img = _with_log(tmp_path, entries)
    oracle = tmp_path / "replayed.vhdx"
    shutil.copy(img, oracle)
    subprocess.run(["qemu-img", "check", "-r", "all", str(oracle)], check=True, capture_output=True)
    expected = as_raw(oracle, tmp_path / "expected.raw")
    assert expected.read_bytes()[4 * MiB + 8192 : 4 * MiB + 12288] == b"\x77" * 4096
    convert_ok(img, tmp_path / "out.qcow2")
    qemu_compare(expected, tmp_path / "out.qcow2")


def test_log_guid_without_valid_entries_is_an_empty_log(tmp_path: Path) -> None:
    """A log GUID with no entry carrying it (a stale entry of another GUID): nothing to replay, as qemu."""
    img = _with_log(
        tmp_path, lambda v, g, size: [(0, log_entry(3, bytes(16), 0, [(v.bat, bytes(4096))], size))]
    )
    expected = as_raw(img, tmp_path / "expected.raw")
    convert_ok(img, tmp_path / "out.qcow2")
    qemu_compare(expected, tmp_path / "out.qcow2")


# ---------------------------------------------------------------- real images


REAL = {  # name: the refusal's words, or "" for an image that converts
    "disk2vhd-dynamic.vhdx.bz2": "",  # both headers identical, same sequence number
    "hyperv2012-dynamic-1G.vhdx.bz2": "",
    "windows-dynamic.vhdx.gz": "",
    "windows-fixed.vhdx.gz": "",
    "qemu-vhdx-dirty-log-hyperv-verified.vhdx.bz2": "",  # a log to replay: qemu's replay is the oracle
    "windows-differencing-noparent.avhdx.gz": "differencing image",
}


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="no real images in ../shared/testdata/real")
@pytest.mark.parametrize("name", list(REAL))
def test_real_images(tmp_path: Path, name: str) -> None:
    src = REAL_DATA / name
    opener = bz2.open if name.endswith(".bz2") else gzip.open
    img = tmp_path / name.rsplit(".", 1)[0]
    with opener(src, "rb") as f, img.open("wb") as out:
        shutil.copyfileobj(f, out)
    dst = tmp_path / "out.qcow2"
    if REAL[name]:
        p = imgpipe("convert", str(img), str(dst))
        assert p.returncode == 3, p.stderr
        assert REAL[name] in error_line(p)
        assert not dst.exists()
        return
    oracle = img
    if "dirty-log" in name:
        oracle = tmp_path / "replayed.vhdx"
        shutil.copy(img, oracle)
        subprocess.run(["qemu-img", "check", "-r", "all", str(oracle)], check=True, capture_output=True)
    convert_ok(img, dst)
    qemu_compare(oracle, dst)


# ---------------------------------------------------------------- refusals


def _differencing(v: Vhdx) -> None:
    at = v.item(FILE_PARAMETERS) + 4
    v.poke(at, "<I", struct.unpack_from("<I", v.buf, at)[0] | 2)


def _bad_headers(v: Vhdx) -> None:
    v.poke(HEADERS[0], "<4s", b"HEAD")
    v.save()
    v.poke(HEADERS[1] + 4, "<I", 12345)  # the second header's checksum no longer matches


def _region_count(v: Vhdx) -> None:
    v.poke(REGION_TABLE + 8, "<I", 2048)


def _unknown_region(required: int) -> Callable[[Vhdx], None]:
    def poke(v: Vhdx) -> None:
        (count,) = struct.unpack_from("<I", v.buf, REGION_TABLE + 8)
        at = REGION_TABLE + 16 + 32 * count
        v.poke(at, "<16sQII", uuid.uuid4().bytes, 64 * MiB, MiB, required)
        v.poke(REGION_TABLE + 8, "<I", count + 1)

    return poke


def _unknown_item(v: Vhdx) -> None:
    at = v.item_entry(PAGE_83)
    v.poke(at, "<16s", uuid.uuid4().bytes)  # page 83 data's entry becomes an unknown required item


def _missing_item(v: Vhdx) -> None:
    at = v.item_entry(PAGE_83)
    v.poke(at, "<16s", uuid.uuid4().bytes)
    v.poke(at + 24, "<I", 0)  # not required: ignored, so page 83 data is missing


def _bat_entry(b: int, value: Callable[[Vhdx], int]) -> Callable[[Vhdx], None]:
    return lambda v: v.poke(v.bat + 8 * b, "<Q", value(v))


def _log_too_big(v: Vhdx) -> None:
    v.poke_headers(H_LOG_GUID, uuid.uuid4().bytes)
    v.poke_headers(H_LOG_LENGTH, 16 * MiB)
    v.buf.extend(bytes(16 * MiB))  # the log must fit in the file: move it to the end
    v.poke_headers(H_LOG_OFFSET, len(v.buf) - 16 * MiB)


def _log_truncated(v: Vhdx) -> None:
    guid = uuid.uuid4().bytes
    log_at = struct.unpack_from("<Q", v.buf, HEADERS[0] + H_LOG_OFFSET[0])[0]
    entry = log_entry(1, guid, 0, [(v.bat, bytes(4096))], len(v.buf) + 8 * MiB)  # the file was longer
    v.buf[log_at : log_at + len(entry)] = entry
    v.poke_headers(H_LOG_GUID, guid)


def _overlapping_regions(v: Vhdx) -> None:
    at = v.regions()[BAT_GUID][0]
    v.poke(at + 16, "<Q", v.metadata)


# name: (poke, words the error line must hold, fix the checksums after the poke)
REFUSALS: dict[str, tuple[Callable[[Vhdx], None], str, bool]] = {
    "differencing": (_differencing, "differencing image", True),
    "both-headers-bad": (_bad_headers, "neither header is valid", False),
    "region-table-signature": (
        lambda v: v.poke(REGION_TABLE, "<4s", b"REGI"),
        "region table signature",
        True,
    ),
    "region-table-checksum": (
        lambda v: v.poke(REGION_TABLE + 100, "<B", 1),
        "region table's checksum",
        False,
    ),
    "region-count-2048": (_region_count, "2048 entries", True),
    "unknown-required-region": (_unknown_region(1), "requires region", True),
    "overlapping-regions": (_overlapping_regions, "overlaps", True),
    "metadata-count-3000": (lambda v: v.poke(v.metadata + 10, "<H", 3000), "3000 entries", True),
    "unknown-required-item": (_unknown_item, "requires metadata item", True),
    "missing-item": (_missing_item, "no page 83 data item", True),
    "block-size-3M": (lambda v: v.poke(v.item(FILE_PARAMETERS), "<I", 3 * MiB), "block size", True),
    "logical-sector-1024": (
        lambda v: v.poke(v.item(LOGICAL_SECTOR), "<I", 1024),
        "logical sector size",
        True,
    ),
    "virtual-size-1PiB": (lambda v: v.poke(v.item(VIRTUAL_DISK_SIZE), "<Q", 1 << 50), "virtual size", True),
    "bat-too-small": (lambda v: v.poke(v.item(VIRTUAL_DISK_SIZE), "<Q", 1 << 40), "BAT region holds", True),
    "bat-entry-beyond-file": (_bat_entry(2, lambda v: (1 << 40) | 6), "beyond the end", True),
    "bat-entry-in-header": (_bat_entry(1, lambda v: 6), "inside the header section", True),
    "bat-entry-in-metadata": (_bat_entry(1, lambda v: v.metadata | 6), "inside the metadata region", True),
    "bat-entry-partially-present": (_bat_entry(0, lambda v: 7), "partially present", True),
    "bat-entry-state-4": (_bat_entry(0, lambda v: 4), "unknown state 4", True),
    "log-too-big": (_log_too_big, "log is 16 MiB", True),
    "log-from-a-longer-file": (_log_truncated, "truncated", True),
}
# Also fed through a pipe (the forward-only reader, no file size): one of each kind of structure.
STREAMED = (
    "differencing",
    "both-headers-bad",
    "region-count-2048",
    "unknown-required-item",
    "bat-entry-in-metadata",
    "log-from-a-longer-file",  # found only past the data: the stream's size is not known up front
)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A qemu-made 6 MiB dynamic image, 1 MiB blocks, every block present: the refusals' raw material."""
    d = tmp_path_factory.mktemp("vhdx")
    raw = d / "disk.raw"
    raw.write_bytes(bytes(range(1, 256)) * (6 * MiB // 255) + bytes(6 * MiB % 255))
    return vhdx(raw, d / "in.vhdx", "-o", "subformat=dynamic,block_size=1M").read_bytes()


def _small(tmp_path: Path, image: bytes) -> Vhdx:
    path = tmp_path / "in.vhdx"
    path.write_bytes(image)
    return Vhdx(path)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused(tmp_path: Path, small_image: bytes, case: str) -> None:
    poke, words, fix = REFUSALS[case]
    v = _small(tmp_path, small_image)
    poke(v)
    img = v.save(fix)
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(img), str(dst))
    assert p.returncode == 3, p.stderr
    line = error_line(p)
    assert "vhdx" in line, line
    assert words in line, line
    assert "Traceback" not in p.stderr.decode()
    assert not dst.exists()
    assert leftovers(tmp_path) == []
    if case in STREAMED:
        p = imgpipe("convert", "-", str(dst), stdin=img.read_bytes())
        assert p.returncode == 3, p.stderr
        assert words in error_line(p), error_line(p)
        assert not dst.exists()
        assert leftovers(tmp_path) == []


def test_truncated_file(tmp_path: Path, small_image: bytes) -> None:
    v = _small(tmp_path, small_image)
    img = v.save()
    with img.open("r+b") as f:
        f.truncate(len(v.buf) - 3 * MiB)  # the last blocks are gone
    p = imgpipe("convert", str(img), str(tmp_path / "out.qcow2"))
    assert p.returncode == 3, p.stderr
    assert "vhdx: BAT entry for block" in error_line(p)
    assert "beyond the end" in error_line(p)


def test_one_bad_header_falls_back_to_the_other(tmp_path: Path, small_image: bytes) -> None:
    """qemu's choice: a header whose checksum fails is ignored, the other one is used."""
    v = _small(tmp_path, small_image)
    v.save()
    v.poke(HEADERS[1] + H_SEQUENCE[0], "<Q", 99)  # the newer header, but its checksum is now wrong
    img = v.save(fix=False)
    expected = as_raw(img, tmp_path / "expected.raw")
    convert_ok(img, tmp_path / "out.qcow2")
    qemu_compare(expected, tmp_path / "out.qcow2")
