"""VDI input (VirtualBox; qemu's block/vdi.c): dynamic and static, odd sizes, blocks allocated out of guest
order (as a VM writes them), discarded blocks, from a file, HTTP (ranged and not), stdin and S3.

qemu-img builds each image from a raw disk with a known pattern (qemu-io writes the out-of-order ones)
and is the oracle (compare, check). Refusals are byte pokes into the little-endian header or block map.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import RangeHTTPServer, S3Store

from tests.helpers import (
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

# Header fields (offset, struct format).
VERSION = (0x44, "<I")
HEADER_SIZE = (0x48, "<I")
IMAGE_TYPE = (0x4C, "<I")
OFFSET_BMAP = (0x154, "<I")
OFFSET_DATA = (0x158, "<I")
SECTOR_SIZE = (0x168, "<I")
DISK_SIZE = (0x170, "<Q")
BLOCK_SIZE = (0x178, "<I")
BLOCKS_IN_IMAGE = (0x180, "<I")
UUID_PARENT = 0x1B8  # 16 bytes


def vdi(raw: Path, out: Path, *opts: str) -> Path:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vdi", *opts, str(raw), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def as_qemu_reads(img: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "vdi", "-O", "raw", str(img), str(out)], check=True)
    return out


def field(data: bytes | bytearray, f: tuple[int, str]) -> int:
    value: int = struct.unpack_from(f[1], data, f[0])[0]
    return value


def poke(data: bytearray, f: tuple[int, str], value: int) -> None:
    struct.pack_into(f[1], data, f[0], value)


def poke_bmap(data: bytearray, entry: int, value: int) -> None:
    struct.pack_into("<I", data, field(data, OFFSET_BMAP) + 4 * entry, value)


def vm_written(tmp: Path, size: int) -> tuple[Path, Path]:
    """A dynamic VDI whose blocks were allocated last-first (file order is the reverse of guest order),
    one block written then discarded (0xFFFFFFFE), and an odd disk size (qemu rounds it up to a sector).
    Returns (image, the raw disk qemu reads from it)."""
    img = tmp / "vm.vdi"
    subprocess.run(["qemu-img", "create", "-f", "vdi", str(img), str(size)], check=True, capture_output=True)
    cmds: list[str] = []
    for k in reversed(range(0, size // MiB)):
        if k != 2:  # a hole
            cmds += ["-c", f"write -P {k % 250 + 1} {k * MiB + 4 * KiB * k} {300 * KiB}"]
    cmds += ["-c", f"write -P 0x77 {size - 512} 512"]  # the last sector of the partial last block
    subprocess.run(["qemu-io", "-f", "vdi", *cmds, str(img)], check=True, capture_output=True)
    data = bytearray(img.read_bytes())
    poke_bmap(data, 3, 0xFFFFFFFE)  # discarded: reads as zeros
    poke(data, DISK_SIZE, size - 100)
    img.write_bytes(data)
    return img, as_qemu_reads(img, tmp / "vm.raw")


@pytest.mark.parametrize(
    ("variant", "size"), [("dynamic", 13 * MiB + 3 * 512), ("static", 6 * MiB + 7 * 512)]
)
def test_qemu_img_vdis_from_file(tmp_path: Path, variant: str, size: int) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", size, seed=size)
    img = vdi(raw, tmp_path / "in.vdi", "-o", f"static={'on' if variant == 'static' else 'off'}")
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", str(img), str(dst), "--json"))
    assert (s["source_format"], s["virtual_size"]) == ("vdi", size)
    qemu_check(dst)
    qemu_compare(raw, dst)


def test_vm_layout_from_file_http_and_stdin(tmp_path: Path, http: RangeHTTPServer) -> None:
    """Guest order is not file order: ranged reads fetch each block where it is, once; one pass (HTTP
    without ranges, stdin) puts them back in order through the reorder window, and names the remedy
    when the window is too small."""
    size = 10 * MiB + 1024
    img, expected = vm_written(tmp_path, size)
    served = tmp_path / "www" / "vm.vdi"
    served.write_bytes(img.read_bytes())
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", str(img), str(dst), "--json"))
    assert s["virtual_size"] == size == expected.stat().st_size
    qemu_check(dst)
    qemu_compare(expected, dst)
    dst.unlink()
    s = summary_of(imgpipe("convert", http.url("/vm.vdi"), str(dst), "--json"))
    assert s["source_bytes_fetched"] <= img.stat().st_size * 1.05 + 64 * KiB
    qemu_compare(expected, dst)
    dst.unlink()
    before = http.request_count()
    summary_of(imgpipe("convert", http.url("/norange/vm.vdi"), str(dst), "--json"))
    assert http.request_count() == before + 1
    qemu_compare(expected, dst)
    dst.unlink()
    p = imgpipe("convert", "-", str(dst), stdin=img.read_bytes(), env={"IMGPIPE_REORDER_BUFFER": "1M"})
    assert p.returncode == 3, p.stderr[-1500:]
    assert "range-capable source" in error_line(p)
    assert "IMGPIPE_REORDER_BUFFER" in error_line(p)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_s3(tmp_path: Path, store: S3Store, bucket: str) -> None:
    size = 6 * MiB + 512
    img, expected = vm_written(tmp_path, size)
    store.client().upload_file(str(img), bucket, "vm.vdi")
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", f"s3://{bucket}/vm.vdi", str(dst), "--json", env=store.env()))
    assert s["source_format"] == "vdi"
    assert s["source_bytes_fetched"] <= img.stat().st_size * 1.05 + 64 * KiB
    qemu_check(dst)
    qemu_compare(expected, dst)


def test_info(tmp_path: Path) -> None:
    img, _ = vm_written(tmp_path, 8 * MiB)
    d = summary_of(imgpipe("info", str(img), "--json"))
    assert (d["format"], d["subformat"], d["virtual_size"], d["cluster_size"]) == (
        "vdi",
        "dynamic",
        8 * MiB,
        MiB,
    )
    assert d["details"]["text"] == "<<< QEMU VM Virtual Disk Image >>>"
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "vdi", str(img)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert d["allocated_size"] == sum(e["length"] for e in json.loads(out.stdout) if e["data"])


# ---------------------------------------------------------------- refusals


def _truncate(data: bytearray) -> None:
    del data[field(data, OFFSET_DATA) + 512 :]  # the data area keeps one sector


def _parent(data: bytearray) -> None:
    data[UUID_PARENT : UUID_PARENT + 16] = bytes(range(1, 17))


REFUSALS: dict[str, tuple[Callable[[bytearray], None], tuple[str, ...]]] = {
    "version-2.0": (lambda d: poke(d, VERSION, 0x00020000), ("version 2.0",)),
    "block-size-2-mib": (lambda d: poke(d, BLOCK_SIZE, 2 * MiB), ("block size",)),
    "sector-size-4096": (lambda d: poke(d, SECTOR_SIZE, 4096), ("sector size",)),
    "block-map-entry-out-of-range": (lambda d: poke_bmap(d, 1, 9000), ("block map entry 1", "9000")),
    "block-map-beyond-file": (lambda d: poke(d, OFFSET_BMAP, 0x7FFFFE00), ("block map", "data area")),
    "blocks-in-image-huge": (lambda d: poke(d, BLOCKS_IN_IMAGE, 0xFFFFFFFF), ("blocks",)),
    "blocks-in-image-past-the-data": (
        lambda d: poke(d, BLOCKS_IN_IMAGE, 1 << 24),
        ("block map", "data area"),
    ),
    "block-map-and-data-beyond-file": (
        lambda d: (poke(d, OFFSET_BMAP, 0x7FFFFE00), poke(d, OFFSET_DATA, 0x80000000)),
        ("block map", "end"),
    ),
    "disk-size-over-blocks": (
        lambda d: poke(d, DISK_SIZE, field(d, BLOCKS_IN_IMAGE) * MiB + 512),
        ("disk size",),
    ),
    "disk-size-2^60": (lambda d: poke(d, DISK_SIZE, 1 << 60), ("disk size",)),
    "differencing-type": (lambda d: poke(d, IMAGE_TYPE, 4), ("differencing",)),
    "differencing-parent-uuid": (_parent, ("differencing",)),
    "unknown-image-type": (lambda d: poke(d, IMAGE_TYPE, 9), ("image type 9",)),
    "header-size-huge": (lambda d: poke(d, HEADER_SIZE, 0xFFFFFFF0), ("header size",)),
    "data-offset-misaligned": (
        lambda d: poke(d, OFFSET_DATA, field(d, OFFSET_DATA) + 100),
        ("sector boundary",),
    ),
    "data-offset-beyond-file": (lambda d: poke(d, OFFSET_DATA, 0xFFFFFE00), ("data",)),
    "truncated": (_truncate, ("past the end",)),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(tmp_path: Path, name: str) -> None:
    """Exit 3, one line naming vdi and what was found, nothing at the destination: from the file, and
    from stdin (where the stream reader may be the one to find a table past the end, in its words)."""
    pokes, words = REFUSALS[name]
    raw = pattern_disk(tmp_path / "disk.raw", 4 * MiB + 512, seed=12)
    img = vdi(raw, tmp_path / "in.vdi")
    data = bytearray(img.read_bytes())
    pokes(data)
    img.write_bytes(data)
    dst = tmp_path / "out.qcow2"
    for stdin, expect in ((False, ("vdi", *words)), (True, ())):
        p = (
            imgpipe("convert", "-", str(dst), stdin=bytes(data))
            if stdin
            else imgpipe("convert", str(img), str(dst))
        )
        line = error_line(p)
        assert p.returncode == 3, (p.returncode, p.stderr[-1500:])
        assert line.startswith("imgpipe: error:"), line
        assert all(w in line for w in expect), line
        assert not dst.exists()
        assert leftovers(tmp_path) == []
