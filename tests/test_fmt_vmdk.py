"""VMDK input: monolithicSparse, streamOptimized (qemu's layout and VMware's, with the directory in a
footer), and descriptors whose extents are sibling objects on HTTP and S3; from a file, HTTP (ranged
and not), stdin and S3. qemu-img builds the images (VMware's streamOptimized layout, which qemu-img
cannot write, is built here and read by qemu-img as the oracle) and checks every output.
"""

from __future__ import annotations

import bz2
import gzip
import json
import random
import shutil
import struct
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from servers import RangeHTTPServer, S3Store

from tests.helpers import (
    REAL_DATA,
    KiB,
    MiB,
    error_line,
    imgpipe,
    leftovers,
    make_raw,
    qemu_check,
    qemu_compare,
    summary_of,
)
from tests.helpers import (
    pattern_disk as _pattern_disk,
)

SECTOR = 512
GRAIN = 64 * KiB


def pattern_disk(path: Path, size: int, seed: int) -> Path:
    """The shared pattern with shorter runs: some grains all zero, some partly."""
    return _pattern_disk(path, size, seed, runs=(4 * KiB, 60 * KiB, 200 * KiB, MiB))


def to_vmdk(raw: Path, out: Path, subformat: str, *opts: str) -> Path:
    o = ",".join((f"subformat={subformat}", *opts))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", o, str(raw), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def vmware_stream(raw: bytes, out: Path, *, reverse: bool = False, gtes: int = 512) -> Path:
    """A streamOptimized VMDK laid out as VMware writes it: grains with markers, then each grain
    table behind a GT marker, then the directory behind a GD marker, a footer (the header again,
    with the directory's place) and an end-of-stream marker; the header at 0 says "directory at the end".
    `reverse` writes the grains in reverse guest order (the tables still map them)."""
    capacity = -(-len(raw) // SECTOR)
    gs = GRAIN // SECTOR
    n_gd = -(-capacity // (gtes * gs))
    desc = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="streamOptimized"\n\n'
        f'# Extent description\nRDONLY {capacity} SPARSE "stream.vmdk"\n\n'
        '#DDB\nddb.adapterType = "lsilogic"\n'
    ).encode()

    def header(gd: int) -> bytes:
        h = struct.pack(
            "<4sIIQQQQIQQQB4sH", b"KDMV", 3, 0x30001, capacity, gs, 1, 1, gtes, 0, gd, 128, 0, b"\n \r\n", 1
        )
        return h.ljust(SECTOR, b"\0")

    def marker(val: int, kind: int) -> bytes:
        return struct.pack("<QII", val, 0, kind).ljust(SECTOR, b"\0")

    body = bytearray(header(0xFFFFFFFFFFFFFFFF) + desc.ljust(SECTOR, b"\0"))
    body += bytes(128 * SECTOR - len(body))
    gd = [0] * n_gd
    gts: dict[int, list[int]] = {}
    order = list(range(n_gd))
    for t in reversed(order) if reverse else order:
        gt = [0] * gtes
        idx = [i for i in range(gtes) if (t * gtes + i) * GRAIN < len(raw)]
        for i in reversed(idx) if reverse else idx:
            g = (t * gtes + i) * GRAIN
            data = raw[g : g + GRAIN]
            if not data.strip(b"\0"):
                continue
            z = zlib.compress(data.ljust(GRAIN, b"\0"))  # VMware writes whole grains
            gt[i] = len(body) // SECTOR
            grain = struct.pack("<QI", g // SECTOR, len(z)) + z
            body += grain.ljust(-(-len(grain) // SECTOR) * SECTOR, b"\0")
        gts[t] = gt
        if any(gt):
            body += marker(-(-4 * gtes // SECTOR), 1)
            gd[t] = len(body) // SECTOR
            body += struct.pack(f"<{gtes}I", *gt).ljust(-(-4 * gtes // SECTOR) * SECTOR, b"\0")
    gd_bytes = struct.pack(f"<{n_gd}I", *gd)
    body += marker(-(-len(gd_bytes) // SECTOR), 2)
    gd_at = len(body) // SECTOR
    body += gd_bytes.ljust(-(-len(gd_bytes) // SECTOR) * SECTOR, b"\0")
    body += struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0") + header(gd_at) + marker(0, 0)
    out.write_bytes(body)
    return out


def convert_ok(src: str, dst: Path, expected: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    s = summary_of(imgpipe("convert", src, str(dst), "--json", env=env))
    qemu_check(dst)
    qemu_compare(expected, dst)
    return s


def refused(p: subprocess.CompletedProcess[bytes], dst: Path, *words: str) -> str:
    assert p.returncode == 3, p.stderr.decode(errors="replace")[-2000:]
    line = error_line(p)
    for w in words:
        assert w in line, line
    assert "Traceback" not in p.stderr.decode(errors="replace")
    assert not dst.exists()
    assert leftovers(dst.parent) == []
    return line


# ---------------------------------------------------------------- sparse files from a file


@pytest.mark.parametrize(
    ("subformat", "opts", "size"),
    [
        ("monolithicSparse", (), 13 * MiB + 3 * 512 + 17),
        ("monolithicSparse", ("zeroed_grain=on",), 5 * MiB + 511),
        ("streamOptimized", (), 11 * MiB + 5 * 512 + 3),
        ("streamOptimized", (), 64 * MiB),  # two grain tables, tables batched in one read
    ],
)
def test_sparse_subformats_from_file(
    tmp_path: Path, subformat: str, opts: tuple[str, ...], size: int
) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", size, seed=size % 97)
    img = to_vmdk(raw, tmp_path / "in.vmdk", subformat, *opts)
    expected = raw
    if opts:  # zero grains (GTE 1) over data, and a plain write on top of one
        for cmd in ("write -z 0 1M", "write -z 2M 192k", "write -P 0x5a 2112k 4k"):
            subprocess.run(["qemu-io", "-f", "vmdk", "-c", cmd, str(img)], check=True, capture_output=True)
        expected = tmp_path / "expected.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(expected)], check=True)
    s = convert_ok(str(img), tmp_path / "out.qcow2", expected)
    assert s["source_format"] == "vmdk"
    assert s["virtual_size"] == -(-size // SECTOR) * SECTOR
    assert s["source_bytes_fetched"] <= img.stat().st_size * 1.05 + 64 * KiB  # type: ignore[operator]


def test_vmware_stream_layout_file_stdin_and_reverse_order(tmp_path: Path) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 40 * MiB + 7 * 512, seed=4)
    img = vmware_stream(raw.read_bytes(), tmp_path / "in.vmdk")
    qemu_compare(raw, img)  # qemu reads our VMware-layout builder's output as the same disk
    dst = tmp_path / "out.qcow2"
    convert_ok(str(img), dst, raw)  # ranged: the footer's directory and the tables after the grains
    dst.unlink()
    s = summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=img.read_bytes()))  # grain markers
    assert s["source_format"] == "vmdk"
    qemu_check(dst)
    qemu_compare(raw, dst)
    dst.unlink()
    # Grains written last-first: a ranged source reads the tables; a stream cannot, and says what to do.
    rev = vmware_stream(raw.read_bytes(), tmp_path / "rev.vmdk", reverse=True)
    qemu_compare(raw, rev)
    line = refused(imgpipe("convert", "-", str(dst), stdin=rev.read_bytes()), dst, "vmdk", "out of order")
    assert "range-capable source" in line
    convert_ok(str(rev), dst, raw)


# ---------------------------------------------------------------- HTTP: ranged, sequential, info


@pytest.mark.parametrize("layout", ["qemu", "vmware"])
def test_stream_optimized_http_fetches_each_byte_once(
    tmp_path: Path, http: RangeHTTPServer, layout: str
) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 48 * MiB + 512, seed=8)
    img = tmp_path / "www" / "in.vmdk"
    if layout == "qemu":
        to_vmdk(raw, img, "streamOptimized")
    else:
        vmware_stream(raw.read_bytes(), img)
    s = convert_ok(http.url("/in.vmdk"), tmp_path / "out.qcow2", raw)
    gets = [r for r in http.log if r.method == "GET"]
    assert all(r.range for r in gets), "every GET is ranged"
    size = img.stat().st_size
    assert http.bytes_sent() <= size * 1.05 + 64 * KiB, (http.bytes_sent(), size)
    assert s["source_bytes_fetched"] == http.bytes_sent()
    # Neighbouring grains coalesce: about one request per 2 MiB window, plus the tables (VMware's
    # layout keeps each of its grain tables after its grains: one read each).
    windows = -(-48 * MiB // (2 * MiB)) + 1
    tables = 2 if layout == "vmware" else 0
    grains = int(s["data_clusters"])  # type: ignore[call-overload]
    assert len(gets) <= windows + tables + 6 < grains, (len(gets), grains)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_sequential_sources_one_pass(tmp_path: Path, http: RangeHTTPServer, subformat: str) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 17 * MiB + 1024 + 5, seed=9)
    img = to_vmdk(raw, tmp_path / "www" / "in.vmdk", subformat)
    dst = tmp_path / "out.qcow2"
    convert_ok(http.url("/norange/in.vmdk"), dst, raw)
    assert http.request_count() == 1
    dst.unlink()
    s = summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=img.read_bytes()))
    assert s["source_format"] == "vmdk"
    qemu_compare(raw, dst)


def test_qemu_stream_with_empty_grain_tables_from_a_sequential_source(
    tmp_path: Path, http: RangeHTTPServer
) -> None:
    """qemu allocates every grain table of a streamOptimized file, most of them empty. A compressed
    grain's end was bounded by the next table even when empty, so the last grain of a table reached to
    the end of the file and a forward reader could not come back for the grains between. With a small
    chunk pool the queues before the decoder also held every chunk its output needed (a deadlock)."""
    raw = bytearray(130 * MiB)
    rng = random.Random(5)
    for at in (0, 3 * MiB, 70 * MiB, 129 * MiB):  # grain tables 0, 2 and 4 hold grains; 1 and 3 none
        raw[at : at + 300 * KiB] = rng.randbytes(300 * KiB)
    (tmp_path / "disk.raw").write_bytes(raw)
    to_vmdk(tmp_path / "disk.raw", tmp_path / "www" / "in.vmdk", "streamOptimized")
    dst = tmp_path / "out.qcow2"
    env = {"IMGPIPE_CHUNK_SIZE": "64K", "IMGPIPE_BUFFERS": "6", "IMGPIPE_REORDER_BUFFER": "1M"}
    convert_ok(http.url("/norange/in.vmdk"), dst, tmp_path / "disk.raw", env=env)
    assert http.request_count() == 1


def test_info_reads_only_the_tables(tmp_path: Path, http: RangeHTTPServer) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 30 * MiB, seed=2)
    img = to_vmdk(raw, tmp_path / "www" / "in.vmdk", "streamOptimized")
    p = imgpipe("info", http.url("/in.vmdk"), "--json")
    d = summary_of(p)
    assert (d["format"], d["subformat"], d["virtual_size"], d["cluster_size"]) == (
        "vmdk",
        "streamOptimized",
        30 * MiB,
        GRAIN,
    )
    assert d["verdict"] == "accepted"
    out = subprocess.run(["qemu-img", "map", "--output=json", str(img)], check=True, capture_output=True)
    assert d["allocated_size"] == sum(e["length"] for e in json.loads(out.stdout) if e["data"])
    assert http.bytes_sent() < img.stat().st_size // 4


# ---------------------------------------------------------------- descriptors with sibling extents


def test_descriptor_extents_over_http(tmp_path: Path, http: RangeHTTPServer) -> None:
    www = tmp_path / "www"
    raw = pattern_disk(tmp_path / "disk.raw", 9 * MiB + 3 * 512 + 1, seed=6)
    dst = tmp_path / "out.qcow2"
    for sub in ("monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse"):
        to_vmdk(raw, www / f"{sub}.vmdk", sub)
        s = convert_ok(http.url(f"/{sub}.vmdk"), dst, raw)
        assert s["source_format"] == "vmdk"
        dst.unlink()
    # Several extents: twoGbMaxExtentSparse of a 4.5 GiB disk is three sparse extent files.
    big = tmp_path / "big.raw"
    with big.open("wb") as f:
        f.truncate(4 * 1024 * MiB + 512 * MiB + 512)
        for at in (0, 2 * 1024 * MiB - 3000, 3 * 1024 * MiB + 12345, 4 * 1024 * MiB + 512 * MiB - 700):
            f.seek(at)
            f.write(random.Random(at).randbytes(70000)[: 4 * 1024 * MiB + 512 * MiB + 512 - at])
    to_vmdk(big, www / "big.vmdk", "twoGbMaxExtentSparse")
    assert len(list(www.glob("big-s00*.vmdk"))) == 3
    convert_ok(http.url("/big.vmdk"), dst, big)


def test_handwritten_descriptor_mixing_flat_zero_and_sparse_extents(
    tmp_path: Path, http: RangeHTTPServer
) -> None:
    """One file used by two FLAT extents at different offsets, a ZERO extent, a RDONLY flat extent and a
    sparse extent: the expected disk is put together here (qemu drops ZERO extents, so it is no oracle)."""
    www = tmp_path / "www"
    a = make_raw(www / "a.bin", 3 * MiB, seed=1, data_fraction=0.6).read_bytes()
    b = make_raw(www / "b.bin", 2 * MiB, seed=2, data_fraction=0.6).read_bytes()
    s_raw = pattern_disk(tmp_path / "s.raw", 2 * MiB + 1024, seed=3)
    to_vmdk(s_raw, www / "s.vmdk", "monolithicSparse")
    lines = [
        'RW 2048 FLAT "a.bin" 0',
        "RW 1000 ZERO",
        'RW 3000 FLAT "a.bin" 2048',
        'RDONLY 2000 FLAT "b.bin" 10',
        'RW 4098 SPARSE "s.vmdk"',
    ]
    expected = (
        a[: 2048 * SECTOR]
        + bytes(1000 * SECTOR)
        + a[2048 * SECTOR : 5048 * SECTOR]
        + b[10 * SECTOR : 2010 * SECTOR]
        + s_raw.read_bytes()
    )
    (tmp_path / "expected.raw").write_bytes(expected)
    (www / "d.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="twoGbMaxExtentFlat"\n\n# Extent description\n' + "\n".join(lines) + "\n"
    )
    convert_ok(http.url("/d.vmdk"), tmp_path / "out.qcow2", tmp_path / "expected.raw")


def test_descriptor_and_extents_on_s3(tmp_path: Path, store: S3Store, bucket: str) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 7 * MiB + 512 * 3, seed=12)
    d = tmp_path / "up"
    d.mkdir()
    to_vmdk(raw, d / "disk.vmdk", "twoGbMaxExtentSparse")
    client = store.client()
    for f in d.iterdir():
        client.upload_file(str(f), bucket, f"images/{f.name}")
    dst = tmp_path / "out.qcow2"
    convert_ok(f"s3://{bucket}/images/disk.vmdk", dst, raw, env=store.env())
    # A descriptor-only upload: its extent is missing, refused (permanently) with what to do.
    client.delete_object(Bucket=bucket, Key="images/disk-s001.vmdk")
    dst.unlink()
    p = imgpipe("convert", f"s3://{bucket}/images/disk.vmdk", str(dst), env=store.env())
    refused(p, dst, "vmdk", "disk-s001.vmdk", "beside")


# ---------------------------------------------------------------- refusals


def _descriptor(create_type: str, *extents: str, extra: str = "") -> str:
    return (
        f"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n{extra}"
        f'createType="{create_type}"\n\n# Extent description\n' + "".join(f"{e}\n" for e in extents)
    )


def test_extents_never_read_from_the_local_filesystem(tmp_path: Path, http: RangeHTTPServer) -> None:
    www = tmp_path / "www"
    (www / "flat.bin").write_bytes(bytes(MiB))
    (www / "ok.vmdk").write_text(_descriptor("monolithicFlat", 'RW 2048 FLAT "flat.bin" 0'))
    (www / "hosts.vmdk").write_text(_descriptor("monolithicFlat", 'RW 2048 FLAT "/etc/hosts" 0'))
    (www / "esc.vmdk").write_text(_descriptor("monolithicFlat", 'RW 2048 FLAT "..%2f..%2fetc%2fhosts" 0'))
    dst = tmp_path / "out.qcow2"
    # A local descriptor: even a bare sibling name is never opened from the local filesystem.
    refused(imgpipe("convert", str(www / "ok.vmdk"), str(dst)), dst, "vmdk", "S3 or HTTP")
    line = refused(imgpipe("convert", str(www / "hosts.vmdk"), str(dst)), dst, "vmdk", "'/etc/hosts'")
    assert "not a sibling file name" in line
    before = http.request_count()
    for name in ("hosts", "esc"):
        line = refused(imgpipe("convert", http.url(f"/{name}.vmdk"), str(dst)), dst, "vmdk")
        assert "not a sibling file name" in line
    assert {r.path for r in http.log[before:]} <= {"/hosts.vmdk", "/esc.vmdk"}
    # From a stream there are no siblings either.
    refused(imgpipe("convert", http.url("/norange/ok.vmdk"), str(dst)), dst, "vmdk")
    # A missing extent over HTTP.
    (www / "gone.vmdk").write_text(_descriptor("monolithicFlat", 'RW 2048 FLAT "gone-flat.vmdk" 0'))
    refused(imgpipe("convert", http.url("/gone.vmdk"), str(dst)), dst, "vmdk", "gone-flat.vmdk", "beside")


REFUSED_TYPES = [
    ("vmfs", 'RW 2048 VMFS "flat.bin"', ("vmfs", "ESX")),
    ("seSparse", 'RW 2048 SESPARSE "flat.bin"', ("seSparse",)),
    ("custom", 'RW 2048 FLAT "flat.bin" 0', ("custom",)),
    ("monolithicFlat", 'NOACCESS 2048 FLAT "flat.bin" 0', ("NOACCESS",)),
]


def test_refused_descriptor_types(tmp_path: Path, http: RangeHTTPServer) -> None:
    (tmp_path / "www" / "flat.bin").write_bytes(bytes(MiB))
    for i, (create_type, extent, _) in enumerate(REFUSED_TYPES):
        (tmp_path / "www" / f"d{i}.vmdk").write_text(_descriptor(create_type, extent))
    dsts = [tmp_path / f"out{i}.qcow2" for i in range(len(REFUSED_TYPES))]
    with ThreadPoolExecutor(len(REFUSED_TYPES)) as pool:
        runs = list(
            pool.map(lambda i: imgpipe("convert", http.url(f"/d{i}.vmdk"), str(dsts[i])), range(len(dsts)))
        )
    for p, dst, (_, _, words) in zip(runs, dsts, REFUSED_TYPES, strict=True):
        refused(p, dst, "vmdk", *words)


def test_snapshot_deltas_refused(tmp_path: Path, http: RangeHTTPServer) -> None:
    www = tmp_path / "www"
    raw = pattern_disk(tmp_path / "disk.raw", 2 * MiB, seed=1)
    to_vmdk(raw, www / "base.vmdk", "monolithicSparse")
    subprocess.run(
        ["qemu-img", "create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(www / "delta.vmdk")],
        check=True,
        capture_output=True,
        cwd=www,
    )
    dst = tmp_path / "out.qcow2"
    refused(imgpipe("convert", str(www / "delta.vmdk"), str(dst)), dst, "vmdk", "parent")
    (www / "d.vmdk").write_text(
        _descriptor("monolithicFlat", 'RW 4096 FLAT "base.vmdk" 0').replace(
            "parentCID=ffffffff", "parentCID=1234abcd"
        )
    )
    refused(imgpipe("convert", http.url("/d.vmdk"), str(dst)), dst, "vmdk", "parentCID=1234abcd")


def test_stream_header_and_grain_checks(tmp_path: Path) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 3 * MiB, seed=5)
    good = vmware_stream(raw.read_bytes(), tmp_path / "good.vmdk").read_bytes()
    dst = tmp_path / "out.qcow2"
    bad = tmp_path / "bad.vmdk"
    # The footer says the grains are larger than the header does.
    poked = bytearray(good)
    struct.pack_into("<Q", poked, len(good) - 1024 + 20, 256)
    bad.write_bytes(poked)
    refused(imgpipe("convert", str(bad), str(dst)), dst, "vmdk", "footer")
    refused(imgpipe("convert", "-", str(dst), stdin=bytes(poked)), dst, "vmdk", "footer")
    # No footer at all while the header says the directory is at the end.
    bad.write_bytes(good[:-1536] + bytes(1536))
    refused(imgpipe("convert", str(bad), str(dst)), dst, "vmdk", "footer")
    # A grain table that leaves out a grain the stream holds: with ranges, the tables rule (as in
    # qemu); a stream's walk of the markers sees the disagreement and refuses rather than guess.
    poked = bytearray(good)
    (gd,) = struct.unpack_from("<Q", poked, len(good) - 1024 + 56)
    (gt,) = struct.unpack_from("<I", poked, gd * SECTOR)
    struct.pack_into("<I", poked, gt * SECTOR, 0)
    bad.write_bytes(poked)
    expected = tmp_path / "expected.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(bad), str(expected)], check=True)
    convert_ok(str(bad), dst, expected)
    dst.unlink()
    refused(imgpipe("convert", "-", str(dst), stdin=bytes(poked)), dst, "vmdk", "grain table")
    # A grain marker whose LBA is not a grain's start.
    poked = bytearray(good)
    struct.pack_into("<Q", poked, 128 * SECTOR, 3)
    refused(imgpipe("convert", "-", str(dst), stdin=bytes(poked)), dst, "vmdk", "grain")


# ---------------------------------------------------------------- images made by other tools


def _real(name: str, tmp_path: Path) -> Path:
    src = REAL_DATA / name
    if not src.exists():
        pytest.skip(f"{src} is not here")
    out = tmp_path / Path(name).name.removesuffix(".bz2").removesuffix(".gz")
    if name.endswith(".bz2"):
        out.write_bytes(bz2.decompress(src.read_bytes()))
    elif name.endswith(".gz"):
        out.write_bytes(gzip.decompress(src.read_bytes()))
    else:
        shutil.copyfile(src, out)
    return out


@pytest.mark.parametrize(
    "name",
    [
        "vmware-streamoptimized-v3-16G.vmdk.bz2",  # VMware, directory in the footer, 16 GiB
        "cot-vmware-ovf/input.vmdk",  # VMware-style, directory in the header and a footer too
        "virtualbox-ovf20-export/ubuntu.2.0-disk1.vmdk",  # VirtualBox, empty 8 GiB disk
    ],
)
def test_real_images_convert(tmp_path: Path, name: str) -> None:
    img = _real(name, tmp_path)
    # qemu's own reading, as qcow2: comparing two qcow2 files of a 16 GiB disk is fast, a vmdk is not.
    ref = tmp_path / "ref.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", str(img), str(ref)], check=True, capture_output=True
    )
    for i, (src, stdin) in enumerate(((str(img), None), ("-", img.read_bytes()))):  # tables, then markers
        dst = tmp_path / f"out{i}.qcow2"
        s = summary_of(imgpipe("convert", src, str(dst), "--json", stdin=stdin))
        assert s["source_format"] == "vmdk"
        qemu_check(dst)
        qemu_compare(ref, dst)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("malformed-afl9-huge-capacity.vmdk.bz2", ("vmdk",)),  # qemu: "L1 size too big"
        ("esxi-sesparse-extent-nodescriptor.vmdk.gz", ("vmdk", "seSparse")),
    ],
)
def test_real_images_refused(tmp_path: Path, name: str, words: tuple[str, ...]) -> None:
    img = _real(name, tmp_path)
    dst = tmp_path / "out.qcow2"
    refused(imgpipe("convert", str(img), str(dst)), dst, *words)
