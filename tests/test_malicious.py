"""Malicious input: every case is built here (qemu-img options, byte pokes at named offsets, splicing)
and must be refused cleanly.

test_malicious (the suite, CORE): each case from a file AND from stdin fed in pieces of 17 B, 512 B,
64 KiB and 1 MiB by a writer thread, five runs in parallel threads. Each run: exit status 3, exactly one
error line (for the file, naming the format and what was found; the sequential path may word it
differently), no traceback, nothing at the destination and no partial file beside it, the child's peak
RSS within RSS_BUDGET (/usr/bin/time, or a small rusage wrapper where it is absent), no hang (a timeout
per run, the process group killed). test_more_refusals: one more header or table rule per case, the
same checks from the file only (time budget). Also: VHDX logs that need replay (refused, or replayed
exactly as qemu replays them), VMDK extents naming other files over HTTP and S3, and an amplification
case (one stored cluster mapped everywhere).

Cases of a format whose decoder is not in pipeline/formats/registry.DECODERS yet are skipped with that
reason (the sniffer refuses such formats wholesale, which would prove nothing about the decoder).
Bugs these tests found are written down in /work/notes/bugs.md.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import pytest
from servers import RangeHTTPServer, S3Store

from pipeline.formats.registry import DECODERS
from tests.helpers import ROOT, KiB, MiB, error_line, leftovers, make_raw

RSS_BUDGET = 300 * MiB
RUN_TIMEOUT = 30.0  # seconds per run: these images are <= 2 MiB, a refusal takes well under a second
CHUNKS = (17, 512, 64 * KiB, MiB)
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
# Where /usr/bin/time is absent: run the tool as a child of a tiny wrapper that reports its peak RSS.
_RSS_WRAPPER = (
    "import resource,subprocess,sys;"
    "rc=subprocess.call(sys.argv[2:]);"
    "open(sys.argv[1],'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss));"
    "sys.exit(rc)"
)

# ---------------------------------------------------------------- running the tool


@dataclass(frozen=True)
class Run:
    variant: str
    returncode: int
    stderr: bytes
    peak_rss: int  # bytes; -1 when it could not be read
    dst: Path
    timed_out: bool = False


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMGPIPE_"))}
    env["PYTHONWARNINGS"] = "error::RuntimeWarning"
    env.update(extra)
    return env


def run_convert(
    src: str, workdir: Path, variant: str, env: dict[str, str], feed: Path | None = None, chunk: int = 0
) -> Run:
    """`imgpipe convert SRC workdir/out.qcow2` under a peak-RSS meter; with `feed`, SRC is "-" and a
    writer thread pushes the file into stdin `chunk` bytes at a time."""
    workdir.mkdir(parents=True, exist_ok=True)
    dst = workdir / "out.qcow2"
    rss_file = workdir / "peak-rss"
    tool = [sys.executable, "-m", "pipeline", "convert", src, str(dst)]
    if TIME:
        cmd = [TIME, "-f", "%M", "-o", str(rss_file), *tool]
    else:
        cmd = [sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *tool]
    with (workdir / "stderr").open("w+b") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=ROOT,
            bufsize=0,
            start_new_session=True,  # a hang is killed with its meter, as one process group
        )
        writer = None
        if feed is not None:
            assert proc.stdin is not None
            writer = threading.Thread(target=_feed, args=(proc.stdin, feed, chunk), daemon=True)
            writer.start()
        timed_out = False
        try:
            proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if writer is not None:
            writer.join(RUN_TIMEOUT)
        if proc.stdin is not None and writer is None:
            proc.stdin.close()
        err.seek(0)
        stderr = err.read()
    peak = -1
    if rss_file.exists():
        lines = rss_file.read_text().split()
        if lines and lines[-1].isdigit():
            peak = int(lines[-1]) * KiB  # both meters report KiB
    return Run(variant, proc.returncode, stderr, peak, dst, timed_out)


def _feed(pipe: IO[bytes], path: Path, chunk: int) -> None:
    data = memoryview(path.read_bytes())
    fd = pipe.fileno()
    try:
        for pos in range(0, len(data), chunk):
            piece = data[pos : pos + chunk]
            while piece:
                piece = piece[os.write(fd, piece) :]
    except OSError:
        pass  # EPIPE: the tool refused early and closed its stdin, as it should
    finally:
        pipe.close()  # EOF for the tool


def problems_of(run: Run, expect: tuple[str, ...]) -> list[str]:
    """Everything wrong with a run that should have been a clean refusal ([] = fine)."""
    text = run.stderr.decode(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("imgpipe:")]
    line = error_line(subprocess.CompletedProcess([], run.returncode, b"", run.stderr))
    out: list[str] = []
    if run.timed_out:
        out.append(f"hung: killed after {RUN_TIMEOUT:g} s")
    if run.returncode != 3:
        out.append(f"exit status {run.returncode}, not 3")
    if "Traceback" in text:
        out.append("a traceback on stderr")
    if len(errors) != 1 or errors[0] != line:
        out.append(f"{len(errors)} error lines, or the error is not the last line")
    low = line.lower()
    for word in expect:
        if not any(alt.lower() in low for alt in word.split("|")):
            out.append(f"error line does not mention {word!r}")
    if run.dst.exists():
        out.append("the destination was written")
    if leftovers(run.dst.parent):
        out.append(f"leftovers: {leftovers(run.dst.parent)}")
    if run.peak_rss < 0:
        out.append("peak RSS not measured")
    elif run.peak_rss > RSS_BUDGET:
        out.append(f"peak RSS {run.peak_rss / MiB:.0f} MiB over the {RSS_BUDGET / MiB:.0f} MiB budget")
    if not out:
        return []
    return [f"[{run.variant}] {'; '.join(out)}; stderr tail: {text[-600:]!r}"]


def assert_refused_everywhere(
    img: Path, tmp: Path, expect: tuple[str, ...], env: dict[str, str] | None = None, stdin: bool = True
) -> None:
    """The file run (message checked) and the four chunked stdin runs (exit 3, one line), in parallel."""
    full_env = _env(env or {})
    jobs = [partial(run_convert, str(img), tmp / "run-file", "file", full_env)]
    if stdin:
        jobs += [
            partial(run_convert, "-", tmp / f"run-stdin-{c}", f"stdin/{c}", full_env, img, c) for c in CHUNKS
        ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(lambda job: job(), jobs))
    results = [(run, expect if run.variant == "file" else ()) for run in runs]
    found = [p for run, exp in results for p in problems_of(run, exp)]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- building images


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _qemu_ok(*args: str | Path) -> bool:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, check=False).returncode == 0


def poke(path: Path, offset: int, fmt: str, value: int | bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def peek(path: Path, offset: int, fmt: str) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        (value,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    return int(value)


def truncate(path: Path, length: int) -> None:
    with path.open("r+b") as f:
        f.truncate(length)


def append_aligned(path: Path, blob: bytes, align: int = 512) -> int:
    """Append `blob` at the next `align` boundary (padding the file to a whole sector); its offset."""
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        off = -(-end // align) * align
        f.write(bytes(off - end) + blob + bytes(-len(blob) % 512))
    return off


def pattern_raw(tmp: Path, size: int = MiB + 3 * 512, seed: int = 1) -> Path:
    return make_raw(tmp / "base.raw", size, seed=seed, data_fraction=0.5)


def edited(build: Callable[[Path], Path], edit: Callable[[Path], object]) -> Callable[[Path], Path]:
    """`build`, then `edit` the image it made."""

    def run(tmp: Path) -> Path:
        img = build(tmp)
        edit(img)
        return img

    return run


def poked(
    build: Callable[[Path], Path],
    at: int | Callable[[Path], int],
    fmt: str,
    value: int | Callable[[Path], int],
) -> Callable[[Path], Path]:
    """`build`, then write `value` at `at` (either may be computed from the image)."""
    return edited(
        build,
        lambda img: poke(img, at(img) if callable(at) else at, fmt, value(img) if callable(value) else value),
    )


# qcow2 header fields (docs/interop/qcow2.rst), big-endian.
Q_VERSION = 4  # >I
Q_BACKING_OFFSET = 8  # >Q
Q_CLUSTER_BITS = 20  # >I
Q_SIZE = 24  # >Q
Q_CRYPT_METHOD = 32  # >I
Q_L1_SIZE = 36  # >I
Q_L1_OFFSET = 40  # >Q
Q_RT_OFFSET = 48  # >Q
Q_RT_CLUSTERS = 56  # >I
Q_INCOMPAT = 72  # >Q
Q_REFCOUNT_ORDER = 96  # >I
Q_HEADER_LENGTH = 100  # >I
Q_COMPRESSION_TYPE = 104  # B
Q_V3_HEADER_END = 112  # header extensions start here in the images qemu-img 7 writes
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
FAR = 1 << 40  # an aligned offset far beyond any test file


def qcow2(tmp: Path, *opts: str, size: int = MiB + 3 * 512) -> Path:
    raw = pattern_raw(tmp, size)
    img = tmp / "in.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts, raw, img)
    raw.unlink()
    return img


def q_l2_offset(img: Path, index: int = 0) -> int:
    return peek(img, peek(img, Q_L1_OFFSET, ">Q") + 8 * index, ">Q") & 0x00FFFFFFFFFFFE00


def q_first_l2_entry(img: Path, compressed: bool) -> int:
    """File offset of the first L2 entry of table 0 that is (or is not) a compressed cluster."""
    l2 = q_l2_offset(img)
    cs = 1 << peek(img, Q_CLUSTER_BITS, ">I")
    table = img.read_bytes()[l2 : l2 + cs]
    for i in range(0, cs, 8):
        (e,) = struct.unpack_from(">Q", table, i)
        if e and bool(e & OFLAG_COMPRESSED) == compressed:
            return l2 + i
    raise AssertionError("no such L2 entry")


def q_set_compressed(img: Path, stream: bytes) -> None:
    """Point the first compressed L2 entry at `stream`, appended to the file (sector aligned)."""
    bits = peek(img, Q_CLUSTER_BITS, ">I")
    entry_at = q_first_l2_entry(img, compressed=True)
    off = append_aligned(img, stream)
    shift = 62 - (bits - 8)
    nsec = -(-len(stream) // 512) - 1
    assert nsec < 1 << (bits - 8), "stream too long for the entry's sector count"
    poke(img, entry_at, ">Q", OFLAG_COMPRESSED | nsec << shift | off)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zstd_rle_frame(declared: int, blocks: int, block: int = 128 * KiB) -> bytes:
    """A zstd frame (single segment, 8-byte content size `declared`) of `blocks` RLE blocks of
    `block` zero bytes: a few bytes per 128 KiB, the shape of a decompression bomb."""
    out = bytearray(b"\x28\xb5\x2f\xfd")
    out.append(0b1110_0000)  # 8-byte frame content size, single segment, no checksum, no dict
    out += struct.pack("<Q", declared)
    for k in range(blocks):
        last = 1 if k == blocks - 1 else 0
        out += (block << 3 | 1 << 1 | last).to_bytes(3, "little") + b"\0"  # RLE block of `block`
    return bytes(out)


def q_poke(field_off: int, fmt: str, value: int | Callable[[int], int], *opts: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = qcow2(tmp, *opts)
        v = value(peek(img, field_off, fmt)) if callable(value) else value
        poke(img, field_off, fmt, v)
        return img

    return build


def q_empty_4m(tmp: Path) -> Path:
    img = tmp / "in.qcow2"
    qemu_img("create", "-f", "qcow2", img, "4M")
    return img


def q_backing(tmp: Path, *opts: str) -> Path:
    base = qcow2(tmp).rename(tmp / "base.qcow2")
    img = tmp / "in.qcow2"
    qemu_img("create", "-f", "qcow2", *opts, "-b", base.name, "-F", "qcow2", img)
    return img


def q_data_file(tmp: Path) -> Path:
    img = tmp / "in.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'data.raw'}", img, "1M")
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", pattern_raw(tmp, MiB), img)
    return img


def q_data_file_ext_only(tmp: Path) -> Path:
    """The data-file header extension is kept, its incompatible bit cleared: the name still says it."""
    img = q_data_file(tmp)
    poke(img, Q_INCOMPAT, ">Q", peek(img, Q_INCOMPAT, ">Q") & ~INCOMPAT_DATA_FILE)
    return img


def q_extension(kind: int, length: int, body: bytes = b"") -> Callable[[Path], Path]:
    """A header extension written over the first one qemu-img put after the header."""

    def build(tmp: Path) -> Path:
        img = qcow2(tmp)
        ext = struct.pack(">II", kind, length) + body.ljust(-(-len(body) // 8) * 8, b"\0")
        with img.open("r+b") as f:
            f.seek(Q_V3_HEADER_END)
            f.write(ext + bytes(8))  # then the end marker
        return img

    return build


def q_l1_entry(value: Callable[[Path], int]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = qcow2(tmp)
        poke(img, peek(img, Q_L1_OFFSET, ">Q"), ">Q", value(img))
        return img

    return build


def q_l2_entry(value: Callable[[Path, int], int]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = qcow2(tmp)
        at = q_first_l2_entry(img, compressed=False)
        poke(img, at, ">Q", value(img, peek(img, at, ">Q")))
        return img

    return build


def q_truncated(at: Callable[[Path], int]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = qcow2(tmp)
        truncate(img, at(img))
        return img

    return build


def q_compressed(stream: Callable[[int], bytes], *opts: str) -> Callable[[Path], Path]:
    """A compressed image whose first compressed cluster is replaced by stream(cluster_size)."""

    def build(tmp: Path) -> Path:
        img = qcow2(tmp, "-c", *opts)
        q_set_compressed(img, stream(1 << peek(img, Q_CLUSTER_BITS, ">I")))
        return img

    return build


def q_compressed_at(offset: int) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = qcow2(tmp, "-c")
        at = q_first_l2_entry(img, compressed=True)
        poke(img, at, ">Q", (peek(img, at, ">Q") & ~((1 << 54) - 1)) | offset)  # 64 KiB clusters
        return img

    return build


def q_subclusters_both(tmp: Path) -> Path:
    img = qcow2(tmp, "-o", "extended_l2=on,cluster_size=64k")
    l2 = q_l2_offset(img)
    poke(img, l2 + 8, ">Q", 0x0000_0001_0000_0001)  # subcluster 0 allocated and zero at once
    return img


def iso_with_qcow2_system_area(tmp: Path) -> Path:
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "README.TXT").write_bytes(b"hello\n" * 1000)
    iso = tmp / "in.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-o", str(iso), "-V", "MAL", str(tree)], check=True, capture_output=True
    )
    q = qcow2(tmp, "-o", "cluster_size=4k", size=64 * KiB)
    head = q.read_bytes()[: 32 * KiB]
    with iso.open("r+b") as f:  # the system area: the 16 sectors before the volume descriptors
        f.write(head)
    return iso


def qed(tmp: Path) -> Path:
    img = tmp / "in.qed"
    qemu_img("convert", "-f", "raw", "-O", "qed", pattern_raw(tmp, MiB), img)
    return img


def luks(tmp: Path) -> Path:
    # LUKS1 by hand (as tests/test_refused.py): qemu-img's key stretching is slow on loaded machines.
    hdr = bytearray(2 * MiB)
    hdr[0:8] = b"LUKS\xba\xbe\x00\x01"
    hdr[8:11] = b"aes"
    hdr[40:51] = b"xts-plain64"
    hdr[72:78] = b"sha256"
    out = tmp / "in.luks"
    out.write_bytes(hdr)
    return out


# VHDX (MS-VHDX), little-endian; GUIDs in Microsoft's mixed-endian layout (uuid bytes_le).
VX_HEADERS = (64 * KiB, 128 * KiB)
VX_HEADER_CRC_SPAN = 4 * KiB
VX_HEADER_LOG_GUID = 48  # 16 bytes
VX_HEADER_LOG_LENGTH = 68  # <I
VX_HEADER_LOG_OFFSET = 72  # <Q
VX_REGION_TABLES = (192 * KiB, 256 * KiB)
VX_REGION_TABLE_SIZE = 64 * KiB
VX_REGION_COUNT = 8  # <I
VX_REGION_ENTRIES = 16  # 32 bytes each: guid, file offset <Q, length <I, required <I
VX_META_COUNT = 10  # <H
VX_META_ENTRIES = 32  # 32 bytes each: item guid, offset <I (from the region start), length <I, flags <I
VX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
VX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
VX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
VX_HAS_PARENT = 2  # file parameters flag
VX_FULLY_PRESENT = 6
_CRC32C = [0] * 256
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C[_n] = _c


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def vx_fix_crc(img: Path, start: int, span: int) -> None:
    """Recompute the CRC-32C at start + 4 over [start, start + span) (headers, region tables, log)."""
    with img.open("r+b") as f:
        f.seek(start)
        block = bytearray(f.read(span))
        block[4:8] = bytes(4)
        f.seek(start + 4)
        f.write(struct.pack("<I", crc32c(bytes(block))))


def vhdx(tmp: Path) -> Path:
    """qemu-img's VHDX of a 1 MiB disk (1 MiB blocks), compacted: its one payload block moved from
    8 MiB to 4 MiB and the file cut to 5 MiB (qemu-img leaves 3 MiB of slack)."""
    img = tmp / "in.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", pattern_raw(tmp, MiB), img)
    bat = vx_region(img, VX_BAT)[0]
    data = bytearray(img.read_bytes())
    (e,) = struct.unpack_from("<Q", data, bat)
    assert e & 7 == VX_FULLY_PRESENT, "qemu-img stored the block"
    old = (e >> 20) << 20
    data[4 * MiB : 5 * MiB] = data[old : old + MiB]
    struct.pack_into("<Q", data, bat, 4 * MiB | VX_FULLY_PRESENT)
    img.write_bytes(data[: 5 * MiB])
    return img


def vx_region(img: Path, guid: bytes) -> tuple[int, int]:
    """(file offset, offset of its region table entry) of a region, from the first region table."""
    table = img.read_bytes()[VX_REGION_TABLES[0] : VX_REGION_TABLES[0] + VX_REGION_TABLE_SIZE]
    (count,) = struct.unpack_from("<I", table, VX_REGION_COUNT)
    for k in range(count):
        at = VX_REGION_ENTRIES + 32 * k
        if table[at : at + 16] == guid:
            return struct.unpack_from("<Q", table, at + 16)[0], VX_REGION_TABLES[0] + at
    raise AssertionError("no such region")


def vx_item(img: Path, guid: bytes) -> int:
    """File offset of a metadata item's value."""
    meta = vx_region(img, VX_METADATA)[0]
    table = img.read_bytes()[meta : meta + 64 * KiB]
    (count,) = struct.unpack_from("<H", table, VX_META_COUNT)
    for k in range(count):
        at = VX_META_ENTRIES + 32 * k
        if table[at : at + 16] == guid:
            return meta + int(struct.unpack_from("<I", table, at + 16)[0])
    raise AssertionError("no such metadata item")


def vx_both_region_tables(edit: Callable[[bytearray], None]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = vhdx(tmp)
        data = bytearray(img.read_bytes())
        for t in VX_REGION_TABLES:
            table = data[t : t + VX_REGION_TABLE_SIZE]
            edit(table)
            table[4:8] = bytes(4)
            struct.pack_into("<I", table, 4, crc32c(bytes(table)))
            data[t : t + VX_REGION_TABLE_SIZE] = table
        img.write_bytes(data)
        return img

    return build


def vx_region_count(count: int) -> Callable[[Path], Path]:
    return vx_both_region_tables(lambda t: struct.pack_into("<I", t, VX_REGION_COUNT, count))


def vx_region_offset(guid: bytes, offset: int) -> Callable[[Path], Path]:
    def edit(t: bytearray) -> None:
        for k in range(struct.unpack_from("<I", t, VX_REGION_COUNT)[0]):
            at = VX_REGION_ENTRIES + 32 * k
            if t[at : at + 16] == guid:
                struct.pack_into("<Q", t, at + 16, offset)

    return vx_both_region_tables(edit)


def vx_unknown_required_region(t: bytearray) -> None:
    n = struct.unpack_from("<I", t, VX_REGION_COUNT)[0]
    at = VX_REGION_ENTRIES + 32 * n
    t[at : at + 16] = uuid.UUID("01234567-89AB-CDEF-0123-456789ABCDEF").bytes_le
    struct.pack_into("<QII", t, at + 16, 6 * MiB, MiB, 1)  # required
    struct.pack_into("<I", t, VX_REGION_COUNT, n + 1)


def vx_item_poke(
    guid: bytes, rel: int, fmt: str, value: int | Callable[[int], int]
) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = vhdx(tmp)
        at = vx_item(img, guid) + rel
        poke(img, at, fmt, value(peek(img, at, fmt)) if callable(value) else value)
        return img

    return build


def vx_bat_entry(value: int) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = vhdx(tmp)
        poke(img, vx_region(img, VX_BAT)[0], "<Q", value)
        return img

    return build


VX_LOG_GUID = uuid.UUID("5EC0DE5E-0000-4000-8000-00000000CAFE").bytes_le
VX_LOG_SECTOR = 4 * KiB


def vx_with_log(*descriptors: tuple[str, int, bytes | int], last: int = 5 * MiB) -> Callable[[Path], Path]:
    """A VHDX whose log holds one valid entry (what an image not closed cleanly carries) and whose
    headers name that log: ("desc", file offset, 4 KiB of data) or ("zero", file offset, length)."""

    def build(tmp: Path) -> Path:
        img = vhdx(tmp)
        seq = 1
        n = len(descriptors)
        head = bytearray(-(-(64 + 32 * n) // VX_LOG_SECTOR) * VX_LOG_SECTOR)
        sectors = b""
        for k, (kind, offset, arg) in enumerate(descriptors):
            at = 64 + 32 * k
            if kind == "zero":
                assert isinstance(arg, int)
                struct.pack_into("<4sIQQQ", head, at, b"zero", 0, arg, offset, seq)
            else:
                assert isinstance(arg, bytes)
                assert len(arg) == VX_LOG_SECTOR
                trailing, leading = (
                    struct.unpack_from("<I", arg, 4092)[0],
                    struct.unpack_from("<Q", arg, 0)[0],
                )
                struct.pack_into("<4sIQQQ", head, at, b"desc", trailing, leading, offset, seq)
                sectors += (
                    b"data" + struct.pack("<I", seq >> 32) + arg[8:4092] + struct.pack("<I", seq & 0xFFFFFFFF)
                )
        entry = bytearray(head + sectors)
        # loge, checksum, entry length, tail, sequence, descriptor count, reserved, log guid, flushed, last
        struct.pack_into(
            "<4sIIIQII16sQQ", entry, 0, b"loge", 0, len(entry), 0, seq, n, 0, VX_LOG_GUID, last, last
        )
        struct.pack_into("<I", entry, 4, crc32c(bytes(entry)))
        log_off = peek(img, VX_HEADERS[0] + VX_HEADER_LOG_OFFSET, "<Q")
        assert len(entry) <= peek(img, VX_HEADERS[0] + VX_HEADER_LOG_LENGTH, "<I")
        with img.open("r+b") as f:
            f.seek(log_off)
            f.write(entry)
            for h in VX_HEADERS:
                f.seek(h + VX_HEADER_LOG_GUID)
                f.write(VX_LOG_GUID)
        for h in VX_HEADERS:
            vx_fix_crc(img, h, VX_HEADER_CRC_SPAN)
        return img

    return build


def vx_headers_broken(tmp: Path) -> Path:
    img = vhdx(tmp)
    for h in VX_HEADERS:
        poke(img, h + VX_HEADER_LOG_LENGTH, "<I", 3 * MiB)  # without fixing the CRC
    return img


# VMDK hosted sparse extent header (VMware's Virtual Disk Format 5.0), little-endian; sectors of 512 B.
V_VERSION = 4  # <I
V_CAPACITY = 12  # <Q
V_GRAIN_SIZE = 20  # <Q
V_DESC_OFFSET = 28  # <Q
V_DESC_SIZE = 36  # <Q
V_NUM_GTES = 44  # <I
V_RGD_OFFSET = 48  # <Q
V_GD_OFFSET = 56  # <Q
V_OVERHEAD = 64  # <Q
V_GRAIN_MARKER = 12  # a streamOptimized grain: LBA <Q, size <I, then the zlib stream
SECTOR = 512


def vmdk(tmp: Path, subformat: str = "monolithicSparse") -> Path:
    img = tmp / "in.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", pattern_raw(tmp, MiB), img)
    return img


def v_poke(at: int, fmt: str, value: int, subformat: str = "monolithicSparse") -> Callable[[Path], Path]:
    return poked(lambda t: vmdk(t, subformat), at, fmt, value)


def v_descriptor(edit: Callable[[str], str]) -> Callable[[Path], Path]:
    """Rewrite the embedded descriptor (sector 1 on, NUL-padded to its declared size)."""

    def build(tmp: Path) -> Path:
        img = vmdk(tmp)
        room = peek(img, V_DESC_SIZE, "<Q") * SECTOR
        with img.open("r+b") as f:
            f.seek(SECTOR)
            text = f.read(room).split(b"\0", 1)[0].decode()
            new = edit(text).encode()
            assert len(new) < room
            f.seek(SECTOR)
            f.write(new.ljust(room, b"\0"))
        return img

    return build


def v_gd_entry(value: int) -> Callable[[Path], Path]:
    return poked(vmdk, lambda img: peek(img, V_GD_OFFSET, "<Q") * SECTOR, "<I", value)


def v_gt_entry(value: int) -> Callable[[Path], Path]:
    def at(img: Path) -> int:
        gt = peek(img, peek(img, V_GD_OFFSET, "<Q") * SECTOR, "<I")
        return gt * SECTOR

    return poked(vmdk, at, "<I", value)


def v_stream_grain(stream: Callable[[int], bytes]) -> Callable[[Path], Path]:
    """A streamOptimized VMDK whose first grain's zlib stream is replaced by stream(room) (it must fit
    the room the original grain took, so the markers after it stay in place)."""

    def build(tmp: Path) -> Path:
        raw = pattern_raw(tmp, MiB)
        with raw.open("r+b") as f:  # an incompressible first grain: room for a 64 KiB stream
            f.write(random.Random(5).randbytes(64 * KiB))
        img = tmp / "in.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
        at = peek(img, V_OVERHEAD, "<Q") * SECTOR
        size = peek(img, at + 8, "<I")
        room = -(-(V_GRAIN_MARKER + size) // SECTOR) * SECTOR - V_GRAIN_MARKER
        new = stream(room)
        assert len(new) <= room, (len(new), room)
        with img.open("r+b") as f:
            f.seek(at + 8)
            f.write(struct.pack("<I", len(new)) + new.ljust(room, b"\0"))
        return img

    return build


def v_descriptor_file(create_type: str, *extents: str) -> Callable[[Path], Path]:
    """A descriptor-only VMDK: `extents` are its extent lines; flat data files exist beside it."""

    def build(tmp: Path) -> Path:
        (tmp / "x").write_bytes(bytes(MiB))
        (tmp / "flat.raw").write_bytes(bytes(MiB))
        img = tmp / "in.vmdk"
        img.write_text(descriptor_text(create_type, *extents))
        return img

    return build


def descriptor_text(create_type: str, *extents: str) -> str:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n# Extent description\n'
        + "".join(f"{e}\n" for e in extents)
        + '\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\nddb.adapterType = "ide"\n'
    )


def cowd(tmp: Path) -> Path:
    img = tmp / "in.vmdk"
    img.write_bytes(b"COWD" + struct.pack("<II", 1, 3) + bytes(MiB - 12))
    return img


# VHD footer and dynamic disk header (Microsoft's VHD specification), big-endian.
H_FOOTER = 512
H_DATA_OFFSET = 16  # >Q
H_CREATOR_APP = 28  # 4s: "qemu" and "vpc " images are sized by their CHS geometry, "win " by this:
H_CURRENT_SIZE = 48  # >Q
H_DISK_TYPE = 60  # >I: 2 fixed, 3 dynamic, 4 differencing
H_CHECKSUM = 64  # >I: ones' complement of the byte sum
D_TABLE_OFFSET = 16  # >Q
D_MAX_TABLE_ENTRIES = 28  # >I
D_BLOCK_SIZE = 32  # >I
D_CHECKSUM = 36  # >I
D_SIZE = 1024


def vhd_checksum(block: bytes | bytearray, at: int) -> int:
    return ~(sum(block) - sum(block[at : at + 4])) & 0xFFFFFFFF


def vhd(tmp: Path, subformat: str = "dynamic") -> Path:
    img = tmp / "in.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat}", pattern_raw(tmp, MiB), img)
    return img


def vhd_footer(
    *pokes: tuple[int, str, int | bytes], subformat: str = "dynamic", seal: bool = True
) -> Callable[[Path], Path]:
    """Poke footer fields in every footer copy (0 for a dynamic disk, and the end); re-seal them."""

    def build(tmp: Path) -> Path:
        img = vhd(tmp, subformat)
        data = bytearray(img.read_bytes())
        copies = [len(data) - H_FOOTER] + ([0] if data.startswith(b"conectix") else [])
        for c in copies:
            for rel, fmt, value in pokes:
                struct.pack_into(fmt, data, c + rel, value)
            if seal:
                struct.pack_into(">I", data, c + H_CHECKSUM, vhd_checksum(data[c : c + H_FOOTER], H_CHECKSUM))
        img.write_bytes(data)
        return img

    return build


def vhd_dynamic(rel: int, fmt: str, value: int) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = vhd(tmp)
        data = bytearray(img.read_bytes())
        (h,) = struct.unpack_from(">Q", data, H_DATA_OFFSET)
        struct.pack_into(fmt, data, h + rel, value)
        struct.pack_into(">I", data, h + D_CHECKSUM, vhd_checksum(data[h : h + D_SIZE], D_CHECKSUM))
        img.write_bytes(data)
        return img

    return build


def vhd_bat_entry(value: int) -> Callable[[Path], Path]:
    def at(img: Path) -> int:
        return peek(img, peek(img, H_DATA_OFFSET, ">Q") + D_TABLE_OFFSET, ">Q")

    return poked(vhd, at, ">I", value)


# VDI header (VirtualBox; qemu's block/vdi.c), little-endian.
I_VERSION = 0x44  # <I, 0x00010001
I_IMAGE_TYPE = 0x4C  # <I: 1 dynamic, 2 static, 3 undo, 4 differencing
I_OFFSET_BMAP = 0x154  # <I
I_OFFSET_DATA = 0x158  # <I
I_SECTOR_SIZE = 0x168  # <I
I_DISK_SIZE = 0x170  # <Q
I_BLOCK_SIZE = 0x178  # <I
I_BLOCKS_IN_IMAGE = 0x180  # <I


def vdi(tmp: Path, *opts: str) -> Path:
    img = tmp / "in.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", *opts, pattern_raw(tmp, MiB), img)
    return img


def vdi_poke(at: int | Callable[[Path], int], fmt: str, value: int, *opts: str) -> Callable[[Path], Path]:
    return poked(lambda t: vdi(t, *opts), at, fmt, value)


def vdi_bmap0(img: Path) -> int:
    return peek(img, I_OFFSET_BMAP, "<I")


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str  # the decoder the case exercises: skipped while it is not in DECODERS ("" = sniffer)
    build: Callable[[Path], Path]
    expect: tuple[str, ...]  # words the file run's error line must contain ("a|b": either)
    env: dict[str, str] = field(default_factory=dict)


def _random_bytes(n: int) -> bytes:
    return random.Random(n).randbytes(n)


QCOW2_CASES = [
    Case("qcow2-backing-file", "qcow2", q_backing, ("qcow2", "backing file")),
    Case(
        "qcow2-v2-backing-file",
        "qcow2",
        lambda t: q_backing(t, "-o", "compat=0.10"),
        ("qcow2", "backing file"),
    ),
    Case("qcow2-data-file", "qcow2", q_data_file, ("qcow2", "external data file")),
    Case("qcow2-data-file-extension-only", "qcow2", q_data_file_ext_only, ("qcow2", "data file")),
    Case("qcow2-aes", "qcow2", q_poke(Q_CRYPT_METHOD, ">I", 1), ("qcow2", "encrypted", "aes")),
    Case("qcow2-luks-method", "qcow2", q_poke(Q_CRYPT_METHOD, ">I", 2), ("qcow2", "encrypted", "luks")),
    Case("qcow2-crypto-extension", "qcow2", q_extension(EXT_CRYPTO, 16, bytes(16)), ("qcow2", "encrypt")),
    Case(
        "qcow2-extension-past-cluster",
        "qcow2",
        q_extension(0x12345678, 0xFFFFFFF0),
        ("qcow2", "extension"),
    ),
    Case(
        "qcow2-corrupt-bit",
        "qcow2",
        q_poke(Q_INCOMPAT, ">Q", lambda v: v | INCOMPAT_CORRUPT),
        ("qcow2", "corrupt"),
    ),
    Case(
        "qcow2-unknown-incompatible-bit",
        "qcow2",
        q_poke(Q_INCOMPAT, ">Q", lambda v: v | 1 << 40),
        ("qcow2", "incompatible"),
    ),
    Case("qcow2-version-4", "qcow2", q_poke(Q_VERSION, ">I", 4), ("qcow2", "version 4")),
    Case("qcow2-version-1", "qcow2", q_poke(Q_VERSION, ">I", 1), ("qcow2", "version 1")),
    Case("qcow2-cluster-bits-8", "qcow2", q_poke(Q_CLUSTER_BITS, ">I", 8), ("qcow2", "cluster", "8")),
    Case("qcow2-cluster-bits-22", "qcow2", q_poke(Q_CLUSTER_BITS, ">I", 22), ("qcow2", "cluster", "22")),
    Case("qcow2-l1-size-0xffffffff", "qcow2", q_poke(Q_L1_SIZE, ">I", 0xFFFFFFFF), ("qcow2", "L1")),
    Case("qcow2-l1-size-too-small", "qcow2", q_poke(Q_L1_SIZE, ">I", 0), ("qcow2", "L1", "needs")),
    Case(
        "qcow2-l1-short-for-grown-size",
        "qcow2",
        q_poke(Q_SIZE, ">Q", 64 << 30),  # 64 GiB on a one-entry L1 table (512 MiB per entry)
        ("qcow2", "L1", "needs"),
    ),
    Case(
        "qcow2-huge-header-length",
        "qcow2",
        q_poke(Q_HEADER_LENGTH, ">I", 0xFFFFFFF8),
        ("qcow2", "header length"),
    ),
    Case("qcow2-refcount-order-7", "qcow2", q_poke(Q_REFCOUNT_ORDER, ">I", 7), ("qcow2", "refcount")),
    Case(
        "qcow2-l1-misaligned",
        "qcow2",
        q_poke(Q_L1_OFFSET, ">Q", lambda v: v + 8),
        ("qcow2", "L1", "aligned"),
    ),
    Case("qcow2-l1-beyond-file", "qcow2", q_poke(Q_L1_OFFSET, ">Q", FAR), ("qcow2", "L1", "beyond|end")),
    Case("qcow2-l1-in-header-cluster", "qcow2", q_poke(Q_L1_OFFSET, ">Q", 0), ("qcow2", "L1", "header")),
    Case(
        "qcow2-refcount-table-misaligned",
        "qcow2",
        q_poke(Q_RT_OFFSET, ">Q", lambda v: v + 512),
        ("qcow2", "refcount", "aligned"),
    ),
    Case(
        "qcow2-refcount-table-beyond-file",
        "qcow2",
        q_poke(Q_RT_OFFSET, ">Q", FAR),
        ("qcow2", "refcount", "beyond|end"),
    ),
    Case(
        "qcow2-refcount-table-huge",
        "qcow2",
        q_poke(Q_RT_CLUSTERS, ">I", 0xFFFFFFFF),
        ("qcow2", "refcount"),
    ),
    Case(
        "qcow2-l1-overlaps-refcount-table",
        "qcow2",
        poked(qcow2, Q_L1_OFFSET, ">Q", lambda img: peek(img, Q_RT_OFFSET, ">Q")),
        ("qcow2", "overlap"),
    ),
    Case(
        "qcow2-l2-misaligned",
        "qcow2",
        q_l1_entry(lambda img: OFLAG_COPIED | q_l2_offset(img) + 512),
        ("qcow2", "L2", "aligned"),
    ),
    Case(
        "qcow2-l2-beyond-file",
        "qcow2",
        q_l1_entry(lambda img: OFLAG_COPIED | FAR),
        ("qcow2", "L2", "beyond|end"),
    ),
    Case(
        "qcow2-l2-in-header-cluster",
        "qcow2",
        q_l1_entry(lambda img: OFLAG_COPIED | 0x200),
        ("qcow2", "L2"),
    ),
    Case(
        "qcow2-l2-on-the-l1-table",
        "qcow2",
        q_l1_entry(lambda img: OFLAG_COPIED | peek(img, Q_L1_OFFSET, ">Q")),
        ("qcow2", "L2", "overlap"),
    ),
    Case(
        "qcow2-l2-on-the-refcount-table",
        "qcow2",
        q_l1_entry(lambda img: OFLAG_COPIED | peek(img, Q_RT_OFFSET, ">Q")),
        ("qcow2", "L2", "overlap"),
    ),
    Case(
        "qcow2-data-cluster-misaligned",
        "qcow2",
        q_l2_entry(lambda img, e: e + 512),
        ("qcow2", "data cluster", "aligned"),
    ),
    Case(
        "qcow2-data-cluster-beyond-file",
        "qcow2",
        q_l2_entry(lambda img, e: OFLAG_COPIED | FAR),
        ("qcow2", "beyond|outside"),
    ),
    Case(
        "qcow2-data-cluster-on-the-l1-table",
        "qcow2",
        q_l2_entry(lambda img, e: OFLAG_COPIED | peek(img, Q_L1_OFFSET, ">Q")),
        ("qcow2", "overlap"),
    ),
    Case(
        "qcow2-subcluster-zero-and-allocated",
        "qcow2",
        q_subclusters_both,
        ("qcow2", "subcluster"),
    ),
    Case(
        "qcow2-extended-l2-small-clusters",
        "qcow2",
        q_poke(Q_INCOMPAT, ">Q", lambda v: v | INCOMPAT_EXTL2, "-o", "cluster_size=4k"),
        ("qcow2", "extended L2"),
    ),
    Case(
        "qcow2-unknown-compression-type",
        "qcow2",
        poked(lambda t: qcow2(t, "-o", "compression_type=zstd"), Q_COMPRESSION_TYPE, "B", 2),
        ("qcow2", "compression type"),
    ),
    Case(
        "qcow2-compression-bit-disagrees",
        "qcow2",
        q_poke(Q_INCOMPAT, ">Q", lambda v: v & ~INCOMPAT_COMPRESSION, "-o", "compression_type=zstd"),
        ("qcow2", "compression"),
    ),
    Case("qcow2-truncated-in-header", "qcow2", q_truncated(lambda img: 48), ("qcow2",)),
    Case(
        "qcow2-truncated-before-l1",
        "qcow2",
        q_truncated(lambda img: peek(img, Q_L1_OFFSET, ">Q")),
        ("qcow2", "L1|truncated|end"),
    ),
    Case(
        "qcow2-truncated-before-l2",
        "qcow2",
        q_truncated(q_l2_offset),
        ("qcow2", "L2|truncated|end"),
    ),
    Case(
        "qcow2-zlib-cluster-expands-beyond-cluster",
        "qcow2",
        q_compressed(lambda cs: deflate(_random_bytes(cs // 4) * 8)),
        ("qcow2", "compressed", "expands|beyond"),
    ),
    Case(
        "qcow2-zlib-bomb",  # 128 KiB of deflate (the most one entry can address) inflating to ~120 MiB
        "qcow2",
        q_compressed(lambda cs: deflate(bytes(120 * MiB))),
        ("qcow2", "compressed"),
    ),
    Case(
        "qcow2-zlib-cluster-expands-short",
        "qcow2",
        q_compressed(lambda cs: deflate(bytes(cs // 2))),
        ("qcow2", "compressed"),
    ),
    Case(
        "qcow2-zlib-garbage",
        "qcow2",
        q_compressed(lambda cs: b"\xff" * 2000),
        ("qcow2", "compressed", "broken"),
    ),
    Case(
        "qcow2-compressed-in-header-cluster",
        "qcow2",
        q_compressed_at(0x10),
        ("qcow2", "compressed"),
    ),
    Case(
        "qcow2-zstd-cluster-expands-beyond-cluster",
        "qcow2",
        q_compressed(
            lambda cs: zstd_rle_frame(2 * cs, 2 * cs // (16 * KiB), 16 * KiB), "-o", "compression_type=zstd"
        ),
        ("qcow2", "compressed"),
    ),
    Case(
        "qcow2-zstd-bomb",  # 32 KiB of RLE blocks inflating to 1 GiB, content size declared honestly
        "qcow2",
        q_compressed(lambda cs: zstd_rle_frame(1 << 30, 8192), "-o", "compression_type=zstd"),
        ("qcow2", "compressed"),
    ),
    Case(
        "qcow2-zstd-declares-a-petabyte",  # one 64 KiB block, a content size of 2^50 in the frame header
        "qcow2",
        q_compressed(lambda cs: zstd_rle_frame(1 << 50, 1, 64 * KiB), "-o", "compression_type=zstd"),
        ("qcow2", "compressed"),
    ),
    Case(
        "qcow2-virtual-size-over-setting",  # a 4 MiB disk in a 192 KiB file, a 1 MiB cap
        "qcow2",
        q_empty_4m,
        ("qcow2", "virtual size", "cap"),
        env={"IMGPIPE_MAX_VIRTUAL_SIZE": "1M"},
    ),
    Case("qcow2-virtual-size-2^60", "qcow2", q_poke(Q_SIZE, ">Q", 1 << 60), ("qcow2", "virtual size")),
    Case(
        "qcow2-virtual-size-2^64-1",
        "qcow2",
        q_poke(Q_SIZE, ">Q", (1 << 64) - 1),
        ("qcow2", "virtual size"),
    ),
    Case(
        "iso-with-qcow2-system-area", "", iso_with_qcow2_system_area, ("more than one format", "iso", "qcow2")
    ),
    Case("qed", "", qed, ("qed",)),
    Case("luks", "", luks, ("luks",)),
]

VHDX_CASES = [
    Case("vhdx-region-count-huge", "vhdx", vx_region_count(0x7FFFFFFF), ("vhdx", "region")),
    Case("vhdx-region-count-2048", "vhdx", vx_region_count(2048), ("vhdx", "region")),
    Case(
        "vhdx-region-table-checksum",
        "vhdx",
        poked(vhdx, VX_REGION_TABLES[0] + VX_REGION_ENTRIES + 24, "<I", 7),  # CRC not fixed
        ("vhdx", "checksum"),
    ),
    Case(
        "vhdx-bat-beyond-file",
        "vhdx",
        vx_region_offset(VX_BAT, 1 << 40),
        ("vhdx", "BAT", "beyond|end|outside"),
    ),
    Case(
        "vhdx-bat-overlaps-the-log",
        "vhdx",
        vx_region_offset(VX_BAT, MiB),
        ("vhdx", "BAT", "overlap"),
    ),
    Case(
        "vhdx-unknown-required-region",
        "vhdx",
        vx_both_region_tables(vx_unknown_required_region),
        ("vhdx", "region"),
    ),
    Case("vhdx-headers-broken", "vhdx", vx_headers_broken, ("vhdx", "header")),
    Case(
        "vhdx-differencing",
        "vhdx",
        vx_item_poke(VX_FILE_PARAMETERS, 4, "<I", lambda v: v | VX_HAS_PARENT),
        ("vhdx", "differencing"),
    ),
    Case(
        "vhdx-block-size-3-mib",
        "vhdx",
        vx_item_poke(VX_FILE_PARAMETERS, 0, "<I", 3 * MiB),
        ("vhdx", "block size"),
    ),
    Case(
        "vhdx-block-size-512-mib",
        "vhdx",
        vx_item_poke(VX_FILE_PARAMETERS, 0, "<I", 512 * MiB),
        ("vhdx", "block size"),
    ),
    Case(
        "vhdx-metadata-count-huge",
        "vhdx",
        poked(vhdx, lambda img: vx_region(img, VX_METADATA)[0] + VX_META_COUNT, "<H", 0xFFFF),
        ("vhdx", "metadata"),
    ),
    Case(
        "vhdx-virtual-size-2^60",
        "vhdx",
        vx_item_poke(VX_VIRTUAL_DISK_SIZE, 0, "<Q", 1 << 60),
        ("vhdx", "virtual size"),
    ),
    Case(
        "vhdx-bat-entry-beyond-file",
        "vhdx",
        vx_bat_entry(1 << 40 | VX_FULLY_PRESENT),
        ("vhdx", "block 0", "beyond|end"),
    ),
    Case(
        "vhdx-bat-entry-in-header-section",
        "vhdx",
        vx_bat_entry(0 | VX_FULLY_PRESENT),
        ("vhdx", "block 0", "header"),
    ),
    Case(
        "vhdx-bat-entry-on-the-bat",
        "vhdx",
        vx_bat_entry(2 * MiB | VX_FULLY_PRESENT),
        ("vhdx", "block 0", "BAT"),
    ),
    Case(
        "vhdx-truncated-in-header-section",
        "vhdx",
        edited(vhdx, lambda img: truncate(img, 200 * KiB)),
        ("vhdx",),
    ),
]

VMDK_CASES = [
    Case("vmdk-grain-size-3-sectors", "vmdk", v_poke(V_GRAIN_SIZE, "<Q", 3), ("vmdk", "grain")),
    Case("vmdk-grain-size-huge", "vmdk", v_poke(V_GRAIN_SIZE, "<Q", 1 << 40), ("vmdk", "grain")),
    Case("vmdk-gtes-per-table-1024", "vmdk", v_poke(V_NUM_GTES, "<I", 1024), ("vmdk", "grain table")),
    Case(
        "vmdk-grain-directory-beyond-file",
        "vmdk",
        poked(poked(vmdk, V_GD_OFFSET, "<Q", 1 << 31), V_RGD_OFFSET, "<Q", 1 << 31),
        ("vmdk", "grain directory|beyond|outside|end"),
    ),
    Case("vmdk-grain-table-beyond-file", "vmdk", v_gd_entry(1 << 31), ("vmdk", "grain table|beyond|end")),
    Case("vmdk-grain-beyond-file", "vmdk", v_gt_entry(1 << 31), ("vmdk", "grain", "beyond|end|outside")),
    Case("vmdk-grain-in-the-header", "vmdk", v_gt_entry(1), ("vmdk", "grain")),
    Case(
        "vmdk-descriptor-not-at-sector-1",
        "vmdk",
        v_poke(V_DESC_OFFSET, "<Q", 5),
        ("vmdk", "descriptor", "sector 1"),
    ),
    Case(
        "vmdk-descriptor-over-1-mib", "vmdk", v_poke(V_DESC_SIZE, "<Q", 4096), ("vmdk", "descriptor", "1 MiB")
    ),
    Case(
        "vmdk-parent-cid",
        "vmdk",
        v_descriptor(lambda d: d.replace("parentCID=ffffffff", "parentCID=0badcafe")),
        ("vmdk", "parent"),
    ),
    Case(
        "vmdk-parent-file-name-hint",
        "vmdk",
        v_descriptor(lambda d: d.replace("createType", 'parentFileNameHint="/etc/base.vmdk"\ncreateType')),
        ("vmdk", "parent"),
    ),
    Case("vmdk-version-4", "vmdk", v_poke(V_VERSION, "<I", 4), ("vmdk", "version")),
    Case("vmdk-capacity-2^60", "vmdk", v_poke(V_CAPACITY, "<Q", 1 << 51), ("vmdk", "virtual size")),
    Case(
        "vmdk-stream-grain-expands-beyond-grain",
        "vmdk",
        v_stream_grain(lambda room: zlib.compress(bytes(256 * KiB), 9)),
        ("vmdk", "grain"),
    ),
    Case(
        "vmdk-stream-grain-bomb",  # 64 KiB of zlib inflating to ~60 MiB
        "vmdk",
        v_stream_grain(lambda room: zlib.compress(bytes(60 * MiB), 9)),
        ("vmdk", "grain"),
    ),
    Case(
        "vmdk-stream-grain-garbage",
        "vmdk",
        v_stream_grain(lambda room: b"\x78\x9c" + b"\xff" * 1000),
        ("vmdk", "grain"),
    ),
    Case(
        "vmdk-extent-etc-hosts",
        "vmdk",
        v_descriptor_file("monolithicFlat", 'RW 2048 FLAT "/etc/hosts" 0'),
        ("vmdk", "/etc/hosts"),
    ),
    Case(
        "vmdk-extent-dotdot",
        "vmdk",
        v_descriptor_file("monolithicFlat", 'RW 2048 FLAT "../x" 0'),
        ("vmdk", "../x"),
    ),
    Case(
        "vmdk-extent-sibling-of-a-local-file",  # even a bare sibling name: local files are never opened
        "vmdk",
        v_descriptor_file("monolithicFlat", 'RW 2048 FLAT "flat.raw" 0'),
        ("vmdk", "S3|HTTP|sibling"),
    ),
    Case(
        "vmdk-extent-sparse-dotdot",
        "vmdk",
        v_descriptor_file("twoGbMaxExtentSparse", 'RW 2048 SPARSE "../../x"'),
        ("vmdk", "../../x"),
    ),
    Case(
        "vmdk-create-type-vmfs",
        "vmdk",
        v_descriptor_file("vmfs", 'RW 2048 VMFS "flat.raw"'),
        ("vmdk", "vmfs"),
    ),
    Case(
        "vmdk-create-type-full-device",
        "vmdk",
        v_descriptor_file("fullDevice", 'RW 2048 FLAT "/dev/sda" 0'),
        ("vmdk", "fullDevice|/dev/sda"),
    ),
    Case("vmdk-esx-cowd", "vmdk", cowd, ("vmdk", "ESX")),
]

VHD_CASES = [
    Case("vhd-differencing", "vhd", vhd_footer((H_DISK_TYPE, ">I", 4)), ("vhd", "differencing")),
    Case(
        "vhd-fixed-footer-says-differencing",
        "vhd",
        vhd_footer((H_DISK_TYPE, ">I", 4), subformat="fixed"),
        ("vhd", "differencing"),
    ),
    Case("vhd-unknown-disk-type", "vhd", vhd_footer((H_DISK_TYPE, ">I", 7)), ("vhd", "disk type")),
    Case(
        "vhd-footer-checksum",
        "vhd",
        vhd_footer((H_CURRENT_SIZE, ">Q", 2 * MiB), seal=False),
        ("vhd", "checksum"),
    ),
    Case("vhd-block-size-3-mib", "vhd", vhd_dynamic(D_BLOCK_SIZE, ">I", 3 * MiB), ("vhd", "block size")),
    Case("vhd-block-size-0", "vhd", vhd_dynamic(D_BLOCK_SIZE, ">I", 0), ("vhd", "block size")),
    Case("vhd-bat-beyond-file", "vhd", vhd_dynamic(D_TABLE_OFFSET, ">Q", 1 << 40), ("vhd", "BAT")),
    Case(
        "vhd-bat-entries-huge",
        "vhd",
        vhd_dynamic(D_MAX_TABLE_ENTRIES, ">I", 0xFFFFFFFF),
        ("vhd", "BAT"),
    ),
    Case("vhd-bat-too-small", "vhd", vhd_dynamic(D_MAX_TABLE_ENTRIES, ">I", 0), ("vhd", "BAT")),
    Case("vhd-bat-entry-beyond-file", "vhd", vhd_bat_entry(0x7FFFFFF0), ("vhd", "BAT entry|block")),
    Case(
        "vhd-dynamic-header-beyond-file",
        "vhd",
        vhd_footer((H_DATA_OFFSET, ">Q", 1 << 40)),
        ("vhd", "header"),
    ),
    Case(
        "vhd-virtual-size-2^60",
        "vhd",
        vhd_footer((H_CREATOR_APP, "4s", b"win "), (H_CURRENT_SIZE, ">Q", 1 << 60)),
        ("vhd", "virtual size"),
    ),
]

VDI_CASES = [
    Case("vdi-block-size-2-mib", "vdi", vdi_poke(I_BLOCK_SIZE, "<I", 2 * MiB), ("vdi", "block size")),
    Case("vdi-block-size-4-kib", "vdi", vdi_poke(I_BLOCK_SIZE, "<I", 4 * KiB), ("vdi", "block size")),
    Case(
        "vdi-block-map-entry-out-of-range",
        "vdi",
        vdi_poke(vdi_bmap0, "<I", 9000),
        ("vdi", "block map|block"),
    ),
    Case(
        "vdi-static-block-map-entry-out-of-range",
        "vdi",
        vdi_poke(vdi_bmap0, "<I", 0x7FFFFFF0, "-o", "static=on"),
        ("vdi", "block map|block"),
    ),
    Case("vdi-block-map-beyond-file", "vdi", vdi_poke(I_OFFSET_BMAP, "<I", 0x7FFFFE00), ("vdi",)),
    Case("vdi-blocks-in-image-huge", "vdi", vdi_poke(I_BLOCKS_IN_IMAGE, "<I", 0xFFFFFFFF), ("vdi",)),
    Case("vdi-disk-size-2^60", "vdi", vdi_poke(I_DISK_SIZE, "<Q", 1 << 60), ("vdi", "size")),
    Case("vdi-differencing", "vdi", vdi_poke(I_IMAGE_TYPE, "<I", 4), ("vdi", "differencing|type")),
    Case("vdi-unknown-image-type", "vdi", vdi_poke(I_IMAGE_TYPE, "<I", 9), ("vdi", "type")),
    Case("vdi-sector-size-4096", "vdi", vdi_poke(I_SECTOR_SIZE, "<I", 4096), ("vdi", "sector")),
    Case("vdi-data-offset-misaligned", "vdi", vdi_poke(I_OFFSET_DATA, "<I", 1000), ("vdi",)),
    Case("vdi-version-2", "vdi", vdi_poke(I_VERSION, "<I", 0x00020000), ("vdi", "version")),
]

CASES = QCOW2_CASES + VHDX_CASES + VMDK_CASES + VHD_CASES + VDI_CASES

# The suite proper: each of these runs from the file and from stdin in four chunkings (five tool runs).
# The other cases above check one more header or table rule each and run from the file only: five runs
# of every case would take the file past its time budget on a two-core machine.
CORE = frozenset(
    {
        "qcow2-backing-file",
        "qcow2-data-file",
        "qcow2-aes",
        "qcow2-corrupt-bit",
        "qcow2-unknown-incompatible-bit",
        "qcow2-version-4",
        "qcow2-cluster-bits-8",
        "qcow2-cluster-bits-22",
        "qcow2-l1-size-0xffffffff",
        "qcow2-l1-size-too-small",
        "qcow2-huge-header-length",
        "qcow2-l1-misaligned",
        "qcow2-l1-beyond-file",
        "qcow2-refcount-table-misaligned",
        "qcow2-refcount-table-beyond-file",
        "qcow2-l1-overlaps-refcount-table",
        "qcow2-l2-misaligned",
        "qcow2-l2-beyond-file",
        "qcow2-l2-in-header-cluster",
        "qcow2-truncated-in-header",
        "qcow2-truncated-before-l1",
        "qcow2-zlib-cluster-expands-beyond-cluster",
        "qcow2-zlib-bomb",
        "qcow2-zstd-bomb",
        "qcow2-zstd-declares-a-petabyte",
        "qcow2-virtual-size-over-setting",
        "qcow2-virtual-size-2^60",
        "iso-with-qcow2-system-area",
        "qed",
        "luks",
        "vmdk-grain-size-3-sectors",
        "vmdk-grain-directory-beyond-file",
        "vmdk-descriptor-not-at-sector-1",
        "vmdk-parent-cid",
        "vmdk-extent-etc-hosts",
        "vmdk-extent-dotdot",
        "vmdk-stream-grain-bomb",
        "vhd-differencing",
        "vhd-footer-checksum",
        "vhd-block-size-3-mib",
        "vhd-bat-beyond-file",
        "vhdx-region-count-huge",
        "vhdx-differencing",
        "vhdx-bat-entry-beyond-file",
        "vdi-block-size-2-mib",
        "vdi-block-map-entry-out-of-range",
    }
)


def _params(cases: list[Case]) -> Iterator[object]:
    for c in cases:
        marks = []
        if c.fmt and c.fmt not in DECODERS:
            marks.append(pytest.mark.skip(reason=f"no {c.fmt} decoder registered yet (DECODERS)"))
        yield pytest.param(c, id=c.name, marks=marks)


def test_enough_cases() -> None:
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.name for c in CASES} >= CORE
    assert len(CORE) >= 30


def _build(tmp_path: Path, case: Case) -> Path:
    build = tmp_path / "build"
    build.mkdir()
    img = case.build(build)
    # VHDX cannot be smaller than its 1 MiB header section, log, BAT and metadata regions.
    assert img.stat().st_size <= (5 * MiB if case.fmt == "vhdx" else 2 * MiB + 64 * KiB), "keep them small"
    return img


@pytest.mark.parametrize("case", list(_params([c for c in CASES if c.name in CORE])))
def test_malicious(tmp_path: Path, case: Case) -> None:
    img = _build(tmp_path, case)
    assert_refused_everywhere(img, tmp_path, case.expect, case.env)


@pytest.mark.parametrize("case", list(_params([c for c in CASES if c.name not in CORE])))
def test_more_refusals(tmp_path: Path, case: Case) -> None:
    img = _build(tmp_path, case)
    assert_refused_everywhere(img, tmp_path, case.expect, case.env, stdin=False)


def test_writer_feeds_every_byte(tmp_path: Path) -> None:
    """The harness itself: a valid image fed in 17-byte pieces converts (so refusals are not an
    artefact of the feeding), and the meter reports a plausible peak RSS."""
    img = qcow2(tmp_path, "-o", "cluster_size=4k", size=256 * KiB)
    run = run_convert("-", tmp_path / "ok", "stdin/17", _env({}), img, 17)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 10 * MiB < run.peak_rss < RSS_BUDGET
    assert run.dst.exists()


BASES: dict[str, tuple[str, Callable[[Path], Path]]] = {  # sniffed format, builder
    "qcow2": ("qcow2", qcow2),
    "qcow2-zlib": ("qcow2", lambda t: qcow2(t, "-c")),
    "qcow2-zstd": ("qcow2", lambda t: qcow2(t, "-c", "-o", "compression_type=zstd")),
    "qcow2-extended-l2": ("qcow2", lambda t: qcow2(t, "-o", "extended_l2=on,cluster_size=64k")),
    "vhdx-compacted": ("vhdx", vhdx),
    "vmdk-sparse": ("vmdk", vmdk),
    "vmdk-stream": ("vmdk", lambda t: vmdk(t, "streamOptimized")),
    "vhd-dynamic": ("vhd", vhd),
    "vhd-fixed": ("vhd", lambda t: vhd(t, "fixed")),
    "vdi": ("vdi", vdi),
    "vdi-static": ("vdi", lambda t: vdi(t, "-o", "static=on")),
}


@pytest.mark.parametrize(
    "base",
    [
        pytest.param(
            k, marks=[pytest.mark.skip(reason=f"no {f} decoder registered yet")] if f not in DECODERS else []
        )
        for k, (f, _) in BASES.items()
    ],
)
def test_unpoked_bases_convert(tmp_path: Path, base: str) -> None:
    """Each case starts from one of these images: untouched, it converts and reads as the raw disk, so
    a refusal above is caused by the poke, not by the base."""
    img = BASES[base][1](tmp_path)
    run = run_convert(str(img), tmp_path / "ok", "file", _env({}))
    assert run.returncode == 0, run.stderr[-2000:]
    expected = tmp_path / "expected.raw"
    fmt = BASES[base][0]
    qemu_img("convert", "-f", {"vhd": "vpc"}.get(fmt, fmt), "-O", "raw", img, expected)
    subprocess.run(["qemu-img", "compare", str(expected), str(run.dst)], check=True, capture_output=True)


# Logs to replay: the issue lets a decoder refuse them or replay them in memory. Either way the checks
# apply to what the replay produces, and a replayed output must equal qemu's replay of the same image.
VHDX_LOGS: dict[str, Callable[[Path], Path]] = {
    "data-over-the-payload": vx_with_log(("desc", 4 * MiB, b"\xab" * VX_LOG_SECTOR)),
    "zeros-over-the-payload": vx_with_log(("zero", 4 * MiB + VX_LOG_SECTOR, 2 * VX_LOG_SECTOR)),
    "rewrites-the-bat-beyond-the-file": vx_with_log(
        ("desc", 2 * MiB, struct.pack("<Q", 1 << 40 | VX_FULLY_PRESENT).ljust(VX_LOG_SECTOR, b"\0"))
    ),
    "writes-far-beyond-the-file": vx_with_log(
        ("desc", 1 << 40, b"\xcd" * VX_LOG_SECTOR), last=(1 << 40) + VX_LOG_SECTOR
    ),
    "rewrites-the-region-table": vx_with_log(("desc", VX_REGION_TABLES[0], b"\xee" * VX_LOG_SECTOR)),
}


@pytest.mark.skipif("vhdx" not in DECODERS, reason="no vhdx decoder registered yet (DECODERS)")
@pytest.mark.parametrize("log", sorted(VHDX_LOGS))
def test_vhdx_log_needing_replay(tmp_path: Path, log: str) -> None:
    """From the file and from stdin in four chunkings: a clean refusal naming the format, or the output
    qemu reads after replaying the log itself (`qemu-img check -r all` on a copy); when qemu cannot
    replay or read the image, only a refusal will do."""
    (tmp_path / "build").mkdir()
    img = VHDX_LOGS[log](tmp_path / "build")
    replayed = tmp_path / "qemu-replayed.vhdx"
    replayed.write_bytes(img.read_bytes())
    raw = tmp_path / "qemu-replayed.raw"
    ok = _qemu_ok("check", "-r", "all", replayed) and _qemu_ok(
        "convert", "-f", "vhdx", "-O", "raw", replayed, raw
    )
    replayed.unlink()  # a 1 TiB sparse file after the "far beyond" replay
    expected = raw if ok else None
    env = _env({})
    jobs = [partial(run_convert, str(img), tmp_path / "run-file", "file", env)]
    jobs += [
        partial(run_convert, "-", tmp_path / f"run-stdin-{c}", f"stdin/{c}", env, img, c) for c in CHUNKS
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(lambda job: job(), jobs))
    found: list[str] = []
    for run in runs:
        if run.returncode == 0 and expected is not None and run.peak_rss <= RSS_BUDGET:
            cmp = subprocess.run(
                ["qemu-img", "compare", str(expected), str(run.dst)], capture_output=True, text=True
            )
            if cmp.returncode:
                found.append(
                    f"[{run.variant}] converted, but not as qemu replays the log: {cmp.stdout}{cmp.stderr}"
                )
            continue
        found += problems_of(run, ("vhdx",) if run.variant == "file" else ())
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- VMDK extents from HTTP and S3

needs_vmdk = pytest.mark.skipif("vmdk" not in DECODERS, reason="no vmdk decoder registered yet (DECODERS)")

# Extent names a descriptor served at /d/desc.vmdk may not use: each one names a file the server does
# hold (so a naive resolver would succeed and leak it), or nothing at all.
LEAKY_EXTENTS = {
    "etc-hosts": ("/etc/hosts", ("vmdk", "/etc/hosts")),
    "dotdot": ("../x", ("vmdk", "../x")),
    "url": ("{base}/x", ("vmdk", "http://")),
    "percent-escaped-dotdot": ("..%2fx", ("vmdk", "..%2fx")),
    "backslash-dotdot": ("..\\x", ("vmdk", "x")),
}


@pytest.fixture
def http(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    root = tmp_path / "www"
    for sub in ("d", "etc"):
        (root / sub).mkdir(parents=True)
    (root / "etc" / "hosts").write_bytes(bytes(MiB))
    (root / "x").write_bytes(bytes(MiB))
    (root / "d" / "flat.raw").write_bytes(random.Random(9).randbytes(MiB))
    with RangeHTTPServer(root) as s:
        yield s


@needs_vmdk
@pytest.mark.parametrize("kind", sorted(LEAKY_EXTENTS))
def test_vmdk_extent_leak_over_http(tmp_path: Path, http: RangeHTTPServer, kind: str) -> None:
    name, expect = LEAKY_EXTENTS[kind]
    name = name.format(base=http.url("/").rstrip("/"))
    desc = tmp_path / "www" / "d" / "desc.vmdk"
    desc.write_text(descriptor_text("monolithicFlat", f'RW 2048 FLAT "{name}" 0'))
    for prefix in ("", "/norange"):
        run = run_convert(
            http.url(f"{prefix}/d/desc.vmdk"), tmp_path / f"run{prefix}", "http" + prefix, _env({})
        )
        found = problems_of(run, expect)
        assert not found, "\n".join(found)
    assert {r.path for r in http.log} <= {"/d/desc.vmdk", "/norange/d/desc.vmdk"}, (
        "only the descriptor is read"
    )


@needs_vmdk
def test_vmdk_missing_sibling_over_http_is_refused(tmp_path: Path, http: RangeHTTPServer) -> None:
    """A descriptor-only upload: its extent is not beside it."""
    desc = tmp_path / "www" / "d" / "desc.vmdk"
    desc.write_text(descriptor_text("monolithicFlat", 'RW 2048 FLAT "absent.raw" 0'))
    run = run_convert(http.url("/d/desc.vmdk"), tmp_path / "run", "http", _env({}))
    found = problems_of(run, ("vmdk", "absent.raw"))
    assert not found, "\n".join(found)


@needs_vmdk
def test_vmdk_sibling_over_http_converts(tmp_path: Path, http: RangeHTTPServer) -> None:
    """The control: the same descriptor naming a bare sibling converts, so the refusals above are about
    the names, not the descriptor."""
    desc = tmp_path / "www" / "d" / "desc.vmdk"
    desc.write_text(descriptor_text("monolithicFlat", 'RW 2048 FLAT "flat.raw" 0'))
    run = run_convert(http.url("/d/desc.vmdk"), tmp_path / "run", "http", _env({}))
    assert run.returncode == 0, run.stderr[-2000:]
    subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(tmp_path / "www" / "d" / "flat.raw"), str(run.dst)],
        check=True,
        capture_output=True,
    )


@needs_vmdk
@pytest.mark.parametrize("name", ["/etc/hosts", "../x"])
def test_vmdk_extent_leak_from_s3(tmp_path: Path, store: S3Store, bucket: str, name: str) -> None:
    s3 = store.client()
    s3.put_object(
        Bucket=bucket, Key="d/desc.vmdk", Body=descriptor_text("monolithicFlat", f'RW 2048 FLAT "{name}" 0')
    )
    s3.put_object(Bucket=bucket, Key="x", Body=bytes(MiB))
    s3.put_object(Bucket=bucket, Key="etc/hosts", Body=bytes(MiB))
    run = run_convert(f"s3://{bucket}/d/desc.vmdk", tmp_path / "run", "s3", _env(store.env()))
    found = problems_of(run, ("vmdk", name))
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- amplification


def q_one_cluster_everywhere(tmp: Path, size: str = "2G") -> Path:
    """A 320 KiB qcow2 whose every L1 entry names the same L2 table and whose every L2 entry names the
    same data cluster: 2 GiB of non-zero guest data from one 64 KiB cluster (a 6500x amplification).
    qemu reads it (its refcounts disagree, which only `qemu-img check` notices)."""
    img = tmp / "in.qcow2"
    qemu_img("create", "-f", "qcow2", img, size)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(img)], check=True, capture_output=True
    )
    l1_off, l1_size = peek(img, Q_L1_OFFSET, ">Q"), peek(img, Q_L1_SIZE, ">I")
    l1e = peek(img, l1_off, ">Q")
    l2 = l1e & 0x00FFFFFFFFFFFE00
    l2e = peek(img, l2, ">Q")
    with img.open("r+b") as f:
        f.seek(l1_off)
        f.write(struct.pack(">Q", l1e) * l1_size)
        f.seek(l2)
        f.write(struct.pack(">Q", l2e) * (64 * KiB // 8))
    return img


def test_qcow2_one_cluster_mapped_everywhere_is_refused(tmp_path: Path) -> None:
    """Design §4 names a decompression-ratio cap: one stored cluster mapped at every guest offset is the
    same amplification without a codec (16 TiB of output from a few hundred KiB, at the default cap).
    The output goes to /dev/null as raw, so a failure here costs seconds, not disk."""
    img = q_one_cluster_everywhere(tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "convert", "-O", "raw", str(img), "-"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env({}),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert p.returncode == 3, f"exit {p.returncode}: {p.stderr.decode(errors='replace')[-600:]}"
    assert "qcow2" in error_line(p)
