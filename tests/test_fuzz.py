"""Property-based fuzzing (hypothesis) of each registered decoder's metadata handling.

Per format: a valid small image is built once with qemu-img; each example mutates its metadata
(header fields, table entries, bytes inside the metadata regions: bit flips, extremes, neighbours,
arbitrary values), writes it and runs `imgpipe convert` on it. The property:

- either a clean refusal: exit 3, exactly one error line, no traceback, nothing at the destination;
- or exit 0 and an output that qemu-img reads identically to what qemu-img reads from the mutated
  input (`qemu-img compare`, and the same virtual size up to qemu's 512-byte rounding).

Never exit 1 or 2, a traceback, or a hang. Choice, documented: when qemu-img itself cannot read the
mutated input (it refuses to open it, or fails reading it), either outcome of ours is accepted, but an
output we do write must still pass `qemu-img check`. qemu checks things we need not (the refcount
structures and the snapshot table, which a converter never reads), so requiring our refusal there
would fail good behaviour; and where qemu is laxer than we are (a compressed cluster that inflates
past its cluster, which qemu truncates) our refusal is always allowed.

Formats whose decoder is not in DECODERS yet are skipped with that reason. Examples are bounded and
derandomized (max_examples per format, no deadline, no example database) so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pipeline.formats.registry import DECODERS
from tests.helpers import ROOT, KiB, MiB, leftovers

# CI: 25 derandomized examples per format. A longer hunt: IMGPIPE_TEST_FUZZ_EXAMPLES=500, and
# IMGPIPE_TEST_FUZZ_RANDOM=1 for fresh examples on every run (failures print their reproduction).
EXAMPLES = int(os.environ.get("IMGPIPE_TEST_FUZZ_EXAMPLES", "25"))
RUN_TIMEOUT = 30.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("IMGPIPE_TEST_FUZZ_RANDOM", "") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Field:
    """A header field: `fmt` is one struct code with its byte order (">I", "<Q", ...)."""

    name: str
    offset: int
    fmt: str


@dataclass(frozen=True)
class Table:
    """A table of `count` entries of `fmt` at `offset` (an L1/L2 table, a BAT, a block map)."""

    name: str
    offset: int
    count: int
    fmt: str


@dataclass
class Base:
    qemu_format: str  # qemu-img -f (vpc for VHD)
    image: bytes
    fields: list[Field]
    tables: list[Table]
    blobs: list[tuple[str, int, int]]  # other metadata byte ranges: (name, offset, length)
    fix: Callable[[bytearray], None] | None = None  # re-seal checksums after a mutation
    notes: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- running


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMGPIPE_"))}
    env["PYTHONWARNINGS"] = "error::RuntimeWarning"
    return env


def _qemu(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(["qemu-img", *args], 124, "", "timed out")


def _virtual_size(path: Path, fmt: str) -> int | None:
    p = _qemu("info", "-f", fmt, "--output=json", str(path))
    if p.returncode:
        return None
    size: int = json.loads(p.stdout)["virtual-size"]
    return size


def _event(text: str) -> None:
    """Counted in --hypothesis-show-statistics; a no-op outside an example (the unmutated base)."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def check_property(work: Path, base: Base, image: bytes) -> None:
    """Run the property on `image`; a failing input is kept beside the work folder (its path is in the
    failure message) so a failure can be replayed by hand."""
    for old in work.iterdir():
        if old.is_file():
            old.unlink()
    src = work / f"in.{base.qemu_format}"
    src.write_bytes(image)
    try:
        _property(work, base, src)
    except BaseException as exc:
        if isinstance(exc, AssertionError | pytest.fail.Exception):
            kept = work.parent / "failures" / f"{hashlib.sha256(image).hexdigest()[:16]}.{base.qemu_format}"
            kept.parent.mkdir(exist_ok=True)
            kept.write_bytes(image)
            raise AssertionError(f"{exc} (input kept at {kept})") from None
        raise


def _property(work: Path, base: Base, src: Path) -> None:
    dst = work / "out.qcow2"
    try:
        p = subprocess.run(
            [sys.executable, "-m", "pipeline", "convert", str(src), str(dst)],
            capture_output=True,
            timeout=RUN_TIMEOUT,
            env=_env(),
            cwd=ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"imgpipe hung on the mutated image (> {RUN_TIMEOUT:g} s)")
    err = p.stderr.decode(errors="replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("imgpipe:")]
    assert "Traceback" not in err, err[-3000:]
    assert p.returncode in (0, 3), f"exit {p.returncode}: {err[-1500:]}"
    if p.returncode == 3:
        _event("refused: " + re.sub(r"0x[0-9a-f]+|\b\d+\b", "N", ": ".join(lines[-1].split(": ")[3:]))[:80])
        assert len(errors) == 1, err[-1500:]
        assert lines[-1] == errors[0], err[-1500:]
        assert not dst.exists(), "a refusal wrote the destination"
        assert leftovers(work) == []
        return
    assert not errors, err[-1500:]
    cmp = _qemu("compare", "-f", base.qemu_format, "-F", "qcow2", str(src), str(dst))
    if cmp.returncode >= 2:  # qemu cannot read the mutated input: nothing to compare with
        _event("converted; qemu-img cannot read the input")
        chk = _qemu("check", str(dst))
        assert chk.returncode == 0, chk.stdout + chk.stderr
        return
    _event("converted; compared with qemu-img")
    assert cmp.returncode == 0, f"our output differs from qemu's reading: {cmp.stdout}{cmp.stderr}"
    theirs, ours = _virtual_size(src, base.qemu_format), _virtual_size(dst, "qcow2")
    if theirs is not None and ours is not None:
        assert -(-ours // 512) == -(-theirs // 512), (ours, theirs)


# ---------------------------------------------------------------- mutations


def _width(fmt: str) -> int:
    return struct.calcsize(fmt) * 8


def _values(data: st.DataObject, width: int, current: int) -> int:
    top = (1 << width) - 1
    choice = data.draw(
        st.one_of(
            st.sampled_from(
                [
                    0,
                    1,
                    top,
                    1 << (width - 1),
                    current + 1,
                    current - 1,
                    current * 2,
                    current >> 1,
                    current << 12,
                ]
            ),
            st.integers(0, width - 1).map(lambda b: current ^ (1 << b)),
            st.integers(0, top),
        )
    )
    return choice & top


def mutate(data: st.DataObject, base: Base) -> bytes:
    img = bytearray(base.image)
    kinds = [k for k, have in (("field", base.fields), ("entry", base.tables), ("bytes", base.blobs)) if have]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "field":
            f = data.draw(st.sampled_from(base.fields), label="field")
            (cur,) = struct.unpack_from(f.fmt, img, f.offset)
            struct.pack_into(f.fmt, img, f.offset, _values(data, _width(f.fmt), cur))
            _event(f"field {f.name}")
        elif kind == "entry":
            t = data.draw(st.sampled_from(base.tables), label="table")
            i = data.draw(st.integers(0, t.count - 1), label="entry")
            at = t.offset + i * struct.calcsize(t.fmt)
            (cur,) = struct.unpack_from(t.fmt, img, at)
            struct.pack_into(t.fmt, img, at, _values(data, _width(t.fmt), cur))
            _event(f"entry of {t.name}")
        else:
            name, off, length = data.draw(st.sampled_from(base.blobs), label="blob")
            at = off + data.draw(st.integers(0, length - 1), label="byte")
            img[at] = data.draw(st.sampled_from([0, 0xFF, img[at] ^ 0x80, img[at] ^ 1, img[at] ^ 0x10]))
            _event(f"byte of {name}")
    # Mostly re-seal the checksums, so the mutation reaches the checks behind them.
    if base.fix is not None and data.draw(st.sampled_from([True, True, True, False]), label="re-seal"):
        base.fix(img)
    return bytes(img)


# ---------------------------------------------------------------- the bases


def _pattern(path: Path, size: int, seed: int) -> Path:
    """Compressible records, random runs and holes, in 4 KiB steps."""
    rng = random.Random(seed)
    buf = bytearray(size)
    for pos in range(0, size, 4 * KiB):
        kind = rng.random()
        n = min(4 * KiB, size - pos)
        if kind < 0.3:
            continue
        if kind < 0.7:
            rec = f"record {pos:#x} ".encode() * 300
            buf[pos : pos + n] = rec[:n]
        else:
            buf[pos : pos + n] = rng.randbytes(n)
    path.write_bytes(buf)
    return path


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


QCOW2_FIELDS = [
    Field("version", 4, ">I"),
    Field("backing_file_offset", 8, ">Q"),
    Field("backing_file_size", 16, ">I"),
    Field("cluster_bits", 20, ">I"),
    Field("size", 24, ">Q"),
    Field("crypt_method", 32, ">I"),
    Field("l1_size", 36, ">I"),
    Field("l1_table_offset", 40, ">Q"),
    Field("refcount_table_offset", 48, ">Q"),
    Field("refcount_table_clusters", 56, ">I"),
    Field("nb_snapshots", 60, ">I"),
    Field("snapshots_offset", 64, ">Q"),
    Field("incompatible_features", 72, ">Q"),
    Field("compatible_features", 80, ">Q"),
    Field("autoclear_features", 88, ">Q"),
    Field("refcount_order", 96, ">I"),
    Field("header_length", 100, ">I"),
    Field("compression_type", 104, "B"),
]


def qcow2_base(tmp: Path) -> Base:
    """~400 KiB: 4 KiB clusters, zlib-compressed and plain data clusters, zero-flag clusters."""
    raw = _pattern(tmp / "base.raw", 320 * KiB + 512, seed=3)
    img = tmp / "base.qcow2"
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=4k", raw, img)
    for cmd in ("write -P 0x5a 8k 8k", "write -z 40k 8k", "write -P 0x33 300k 4k"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(img)], check=True, capture_output=True)
    data = img.read_bytes()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    vsize = struct.unpack_from(">Q", data, 24)[0]
    l1_size, l1_off, rt_off = struct.unpack_from(">IQQ", data, 36)
    rt_clusters = struct.unpack_from(">I", data, 56)[0]
    tables = [Table("L1", l1_off, l1_size, ">Q")]
    used = -(-vsize // cs)
    kinds = {"compressed": 0, "plain": 0, "zero": 0}
    for t in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_off + 8 * t)[0] & 0x00FFFFFFFFFFFE00
        if l2:
            n = min(cs // 8, used - t * (cs // 8))
            tables.append(Table(f"L2 {t}", l2, n, ">Q"))
            for (e,) in struct.iter_unpack(">Q", data[l2 : l2 + 8 * n]):
                if e & 1 << 62:
                    kinds["compressed"] += 1
                elif e & 1:
                    kinds["zero"] += 1
                elif e:
                    kinds["plain"] += 1
    assert all(kinds.values()), kinds  # the base has every kind of cluster
    rt_entries = struct.unpack_from(">Q", data, rt_off)[0]
    blobs = [
        ("header extensions", 112, 256),
        ("refcount table", rt_off, 64),
        ("refcount block", rt_entries, 256),
    ]
    assert rt_clusters >= 1
    return Base("qcow2", data, QCOW2_FIELDS, tables, blobs, notes=kinds)


# VHDX (MS-VHDX): see tests/test_malicious.py for the layout constants.
_VX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
_VX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le


def _crc32c_table() -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_CRC = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


VX_SEALED = ((64 * KiB, 4 * KiB), (128 * KiB, 4 * KiB), (192 * KiB, 64 * KiB), (256 * KiB, 64 * KiB))


def _vx_seal(img: bytearray) -> None:
    """Recompute both headers' (4 KiB) and both region tables' (64 KiB) CRC-32C."""
    for start, span in (
        (64 * KiB, 4 * KiB),
        (128 * KiB, 4 * KiB),
        (192 * KiB, 64 * KiB),
        (256 * KiB, 64 * KiB),
    ):
        img[start + 4 : start + 8] = bytes(4)
        struct.pack_into("<I", img, start + 4, crc32c(img[start : start + span]))


def vhdx_base(tmp: Path) -> Base:
    """qemu-img's VHDX of a 2 MiB disk with 1 MiB blocks, the one stored block moved next to the
    metadata region and the slack cut (5 MiB)."""
    raw = _pattern(tmp / "base.raw", 2 * MiB, seed=4)
    raw.write_bytes(raw.read_bytes()[:MiB] + bytes(MiB))  # the second block stays absent
    img = tmp / "base.vhdx"
    _qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", raw, img)
    data = bytearray(img.read_bytes())
    rt = 192 * KiB
    regions = {}
    for k in range(struct.unpack_from("<I", data, rt + 8)[0]):
        at = rt + 16 + 32 * k
        regions[bytes(data[at : at + 16])] = (struct.unpack_from("<Q", data, at + 16)[0], at)
    bat, meta = regions[_VX_BAT][0], regions[_VX_METADATA][0]
    (e,) = struct.unpack_from("<Q", data, bat)
    old = (e >> 20) << 20
    data[4 * MiB : 5 * MiB] = data[old : old + MiB]
    struct.pack_into("<Q", data, bat, 4 * MiB | 6)
    data = data[: 5 * MiB]
    fields = []
    for h, name in ((64 * KiB, "header 1"), (128 * KiB, "header 2")):
        fields += [
            Field(f"{name} sequence", h + 8, "<Q"),
            Field(f"{name} log guid", h + 48, "<Q"),
            Field(f"{name} log version", h + 64, "<H"),
            Field(f"{name} version", h + 66, "<H"),
            Field(f"{name} log length", h + 68, "<I"),
            Field(f"{name} log offset", h + 72, "<Q"),
        ]
    fields.append(Field("region count", rt + 8, "<I"))
    for guid, name in ((_VX_BAT, "BAT"), (_VX_METADATA, "metadata")):
        at = regions[guid][1]
        fields += [
            Field(f"{name} region offset", at + 16, "<Q"),
            Field(f"{name} region length", at + 24, "<I"),
            Field(f"{name} region required", at + 28, "<I"),
        ]
    fields.append(Field("metadata entry count", meta + 10, "<H"))
    for k in range(struct.unpack_from("<H", data, meta + 10)[0]):
        at = meta + 32 + 32 * k
        item = meta + struct.unpack_from("<I", data, at + 16)[0]
        name = str(uuid.UUID(bytes_le=bytes(data[at : at + 16])))[:8]
        fields += [
            Field(f"metadata {name} offset", at + 16, "<I"),
            Field(f"metadata {name} length", at + 20, "<I"),
            Field(f"metadata {name} flags", at + 24, "<I"),
            Field(f"metadata {name} value", item, "<I"),
            Field(f"metadata {name} value+4", item + 4, "<I"),
        ]
    _vx_seal(data)
    tables = [Table("BAT", bat, 3, "<Q")]  # two payload blocks and the chunk's bitmap entry
    blobs = [("header 1", 64 * KiB, 80), ("region table", rt, 80), ("metadata table", meta, 192)]
    return Base("vhdx", bytes(data), fields, tables, blobs, fix=_vx_seal)


def _sectors(n: int) -> int:
    return -(-n // 512) * 512


VMDK_FIELDS = [
    Field("version", 4, "<I"),
    Field("flags", 8, "<I"),
    Field("capacity", 12, "<Q"),
    Field("grain size", 20, "<Q"),
    Field("descriptor offset", 28, "<Q"),
    Field("descriptor size", 36, "<Q"),
    Field("GTEs per GT", 44, "<I"),
    Field("redundant GD offset", 48, "<Q"),
    Field("GD offset", 56, "<Q"),
    Field("overhead", 64, "<Q"),
    Field("unclean shutdown", 72, "B"),
    Field("compression", 77, "<H"),
]


def vmdk_base(tmp: Path) -> Base:
    """monolithicSparse, 1 MiB disk, 64 KiB grains: header, descriptor, GD, redundant GD, GTs, grains."""
    raw = _pattern(tmp / "base.raw", MiB + 512 * 3, seed=5)
    img = tmp / "base.vmdk"
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", raw, img)
    data = img.read_bytes()
    capacity, grain, _, desc_size, gtes, rgd, gd = struct.unpack_from("<QQQQIQQ", data, 12)
    n_gd = -(-capacity // (grain * gtes))
    tables = [Table("GD", gd * 512, n_gd, "<I"), Table("redundant GD", rgd * 512, n_gd, "<I")]
    used = -(-capacity // grain)
    for k in range(n_gd):
        gt = struct.unpack_from("<I", data, gd * 512 + 4 * k)[0]
        if gt:
            tables.append(Table(f"GT {k}", gt * 512, min(gtes, used - k * gtes), "<I"))
    blobs = [("descriptor", 512, desc_size * 512)]
    return Base("vmdk", data, VMDK_FIELDS, tables, blobs)


def vmdk_stream_base(tmp: Path) -> Base:
    """streamOptimized: header, descriptor, then markers: grains (LBA, size, zlib), GT, GD, footer, EOS."""
    raw = _pattern(tmp / "base.raw", 640 * KiB + 512, seed=6)
    img = tmp / "base.vmdk"
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
    data = img.read_bytes()
    desc_size = struct.unpack_from("<Q", data, 36)[0]
    pos = struct.unpack_from("<Q", data, 64)[0] * 512
    fields = list(VMDK_FIELDS)
    blobs = [("descriptor", 512, desc_size * 512)]
    tables = []
    while pos + 16 <= len(data):
        val, size = struct.unpack_from("<QI", data, pos)
        if size:  # a grain: LBA, compressed size, the stream
            fields += [Field(f"grain@{pos:#x} LBA", pos, "<Q"), Field(f"grain@{pos:#x} size", pos + 8, "<I")]
            blobs.append((f"grain@{pos:#x} stream", pos + 12, min(size, 64)))
            pos += _sectors(12 + size)
            continue
        kind = struct.unpack_from("<I", data, pos + 12)[0]
        fields += [
            Field(f"marker@{pos:#x} sectors", pos, "<Q"),
            Field(f"marker@{pos:#x} type", pos + 12, "<I"),
        ]
        if kind == 0:  # end of stream
            break
        if kind in (1, 2):  # a grain table or the grain directory after its marker sector
            tables.append(Table(f"{'GT' if kind == 1 else 'GD'}@{pos:#x}", pos + 512, val * 128, "<I"))
        if kind == 3:  # the footer: a copy of the header
            fields += [Field(f"footer {f.name}", pos + 512 + f.offset, f.fmt) for f in VMDK_FIELDS]
        pos += 512 + val * 512
    return Base("vmdk", data, fields, tables, blobs)


VHD_FOOTER_FIELDS = [
    ("features", 8, ">I"),
    ("version", 12, ">I"),
    ("data offset", 16, ">Q"),
    ("creator app", 28, ">I"),
    ("original size", 40, ">Q"),
    ("current size", 48, ">Q"),
    ("cylinders", 56, ">H"),
    ("heads", 58, "B"),
    ("sectors", 59, "B"),
    ("disk type", 60, ">I"),
    ("checksum", 64, ">I"),
]
VHD_DYN_FIELDS = [
    ("data offset", 8, ">Q"),
    ("table offset", 16, ">Q"),
    ("header version", 24, ">I"),
    ("max table entries", 28, ">I"),
    ("block size", 32, ">I"),
    ("checksum", 36, ">I"),
]


def _vhd_sum(block: bytes | bytearray, at: int) -> int:
    return ~(sum(block) - sum(block[at : at + 4])) & 0xFFFFFFFF


def _vhd_seal(img: bytearray) -> None:
    """Recompute the footer checksums (the copy at 0 and the footer at the end) and the dynamic header's."""
    for at in (0, len(img) - 512):
        if img[at : at + 8] == b"conectix":
            struct.pack_into(">I", img, at + 64, _vhd_sum(img[at : at + 512], 64))
    (h,) = struct.unpack_from(">Q", img, 16)
    if img[:8] == b"conectix" and h + 1024 <= len(img) and img[h : h + 8] == b"cxsparse":
        struct.pack_into(">I", img, h + 36, _vhd_sum(img[h : h + 1024], 36))


def vhd_base(tmp: Path) -> Base:
    """Dynamic, a 1.5 MiB disk in one 2 MiB block: footer copy, dynamic header, BAT, bitmap, block, footer."""
    raw = _pattern(tmp / "base.raw", 3 * MiB // 2, seed=7)
    img = tmp / "base.vhd"
    _qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, img)
    data = img.read_bytes()
    end = len(data) - 512
    fields = [Field(f"footer {n}", o, f) for n, o, f in VHD_FOOTER_FIELDS]
    fields += [Field(f"end footer {n}", end + o, f) for n, o, f in VHD_FOOTER_FIELDS]
    (h,) = struct.unpack_from(">Q", data, 16)
    fields += [Field(f"dynamic header {n}", h + o, f) for n, o, f in VHD_DYN_FIELDS]
    bat, entries = struct.unpack_from(">Q", data, h + 16)[0], struct.unpack_from(">I", data, h + 28)[0]
    (block0,) = struct.unpack_from(">I", data, bat)
    tables = [Table("BAT", bat, entries, ">I")]
    blobs = [("block bitmap", block0 * 512, 512), ("parent locators", h + 576, 48)]
    return Base("vpc", data, fields, tables, blobs, fix=_vhd_seal)


VDI_FIELDS = [
    Field("signature", 0x40, "<I"),
    Field("version", 0x44, "<I"),
    Field("header size", 0x48, "<I"),
    Field("image type", 0x4C, "<I"),
    Field("image flags", 0x50, "<I"),
    Field("block map offset", 0x154, "<I"),
    Field("data offset", 0x158, "<I"),
    Field("sector size", 0x168, "<I"),
    Field("disk size", 0x170, "<Q"),
    Field("block size", 0x178, "<I"),
    Field("block extra", 0x17C, "<I"),
    Field("blocks in image", 0x180, "<I"),
    Field("blocks allocated", 0x184, "<I"),
    Field("parent uuid", 0x1B8, "<Q"),
]


def vdi_base(tmp: Path) -> Base:
    """Dynamic, a 3 MiB disk with 1 MiB blocks, the middle one absent: header, block map, two blocks."""
    raw = _pattern(tmp / "base.raw", 3 * MiB, seed=8)
    with raw.open("r+b") as f:
        f.seek(MiB)
        f.write(bytes(MiB))
    img = tmp / "base.vdi"
    _qemu_img("convert", "-f", "raw", "-O", "vdi", raw, img)
    data = img.read_bytes()
    bmap, blocks = struct.unpack_from("<I", data, 0x154)[0], struct.unpack_from("<I", data, 0x180)[0]
    tables = [Table("block map", bmap, blocks, "<I")]
    return Base("vdi", data, VDI_FIELDS, tables, [("header text", 0, 64)])


BASES: dict[str, Callable[[Path], Base]] = {
    "qcow2": qcow2_base,
    "vhdx": vhdx_base,
    "vmdk": vmdk_base,
    "vmdk-stream": vmdk_stream_base,
    "vhd": vhd_base,
    "vdi": vdi_base,
}


@pytest.fixture(scope="module", params=sorted(BASES))
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Base, Path]:
    fmt = request.param
    decoder = fmt.split("-")[0]
    if decoder not in DECODERS:
        pytest.skip(f"no {decoder} decoder registered yet (DECODERS)")
    tmp = tmp_path_factory.mktemp(f"fuzz-{fmt}")
    b = BASES[fmt](tmp)
    work = tmp / "work"
    work.mkdir()
    return b, work


def test_unmutated_base_converts(base: tuple[Base, Path]) -> None:
    """The property holds for the base itself, and it converts (the mutations start from a good image)."""
    b, work = base
    check_property(work, b, b.image)
    assert (work / "out.qcow2").exists()


@FUZZ
@given(data=st.data())
def test_mutated_metadata(base: tuple[Base, Path], data: st.DataObject) -> None:
    b, work = base
    check_property(work, b, mutate(data, b))
