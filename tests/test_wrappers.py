"""Compressed inputs (gzip, xz, bzip2, zstd) convert in one pass, from a file, HTTP and S3.

Fixtures are made with the real command-line tools and qemu-img, as users make them: several
gzip members (`cat a.gz b.gz`), multi-stream and multi-block xz, multi-stream bzip2, multi-frame
zstd, a qcow2 and a streamOptimized VMDK inside a wrapper, a gzip inside zstd. Each output is checked
with qemu-img check and compare against the raw disk it was made from. Bombs and broken streams are
refused with exit 3 and nothing written.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from servers import RangeHTTPServer, S3Store

from pipeline.unwrap import INFLATERS
from tests.helpers import (
    MiB,
    error_line,
    imgpipe,
    leftovers,
    pattern_disk,
    qemu_check,
    qemu_compare,
    summary_of,
)

DISK_SIZE = 24 * MiB + 4096  # several chunks, not a whole number of them

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gzip", "xz", "bzip2", "zstd", "qemu-img")),
    reason="needs gzip, xz, bzip2, zstd and qemu-img",
)


def _sh(cmd: str, cwd: Path) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, check=True, capture_output=True)


def _split(raw: Path, parts: int) -> list[Path]:
    """The raw disk cut into `parts` pieces (compressed separately, then concatenated)."""
    data = raw.read_bytes()
    step = -(-len(data) // parts)
    out = []
    for i in range(parts):
        p = raw.parent / f"{raw.name}.part{i}"
        p.write_bytes(data[i * step : (i + 1) * step])
        out.append(p)
    return out


# name -> how to make it from disk.raw in the same directory (returns the file name)
MAKERS: dict[str, Callable[[Path], str]] = {}


def maker(name: str) -> Callable[[Callable[[Path], str]], Callable[[Path], str]]:
    def register(fn: Callable[[Path], str]) -> Callable[[Path], str]:
        MAKERS[name] = fn
        return fn

    return register


@maker("raw.xz")
def _raw_xz(d: Path) -> str:
    # Two streams, the first of several 1 MiB blocks, joined with stream padding between them.
    a, b = _split(d / "disk.raw", 2)
    with (d / "disk.raw.xz").open("wb") as f:
        f.write(
            subprocess.run(
                ["xz", "-1", "-T1", "--block-size=1MiB", "-c", str(a)], check=True, capture_output=True
            ).stdout
        )
        f.write(bytes(8))
        f.write(subprocess.run(["xz", "-1", "-c", str(b)], check=True, capture_output=True).stdout)
    a.unlink()
    b.unlink()
    return "disk.raw.xz"


@maker("raw.xz multi-block")
def _raw_xz_blocks(d: Path) -> str:
    # Multi-threaded xz (block sizes in the headers: decoded on several cores), then a stream without.
    a, b = _split(d / "disk.raw", 2)
    with (d / "blocks.raw.xz").open("wb") as f:
        f.write(_xz_blocks(a.read_bytes()))
        f.write(subprocess.run(["xz", "-1", "-c", str(b)], check=True, capture_output=True).stdout)
    a.unlink()
    b.unlink()
    return "blocks.raw.xz"


@maker("img.gz")
def _img_gz(d: Path) -> str:
    pieces = _split(d / "disk.raw", 3)
    _sh(f"for p in {' '.join(p.name for p in pieces)}; do gzip -1 -c $p; done > disk.img.gz", d)
    for p in pieces:
        p.unlink()
    return "disk.img.gz"


@maker("qcow2.gz")
def _qcow2_gz(d: Path) -> str:
    _sh("qemu-img convert -f raw -O qcow2 disk.raw inner.qcow2 && gzip -1 -c inner.qcow2 > disk.qcow2.gz", d)
    return "disk.qcow2.gz"


@maker("vmdk.zst")
def _vmdk_zst(d: Path) -> str:
    _sh(
        "qemu-img convert -f raw -O vmdk -o subformat=streamOptimized disk.raw inner.vmdk"
        " && zstd -q -1 -c inner.vmdk > disk.vmdk.zst",
        d,
    )
    return "disk.vmdk.zst"


@maker("raw.bz2")
def _raw_bz2(d: Path) -> str:
    pieces = _split(d / "disk.raw", 2)
    _sh(f"for p in {' '.join(p.name for p in pieces)}; do bzip2 -1 -c $p; done > disk.raw.bz2", d)
    for p in pieces:
        p.unlink()
    return "disk.raw.bz2"


@maker("raw.zst multi-frame")
def _raw_zst_frames(d: Path) -> str:
    pieces = _split(d / "disk.raw", 4)
    _sh(f"for p in {' '.join(p.name for p in pieces)}; do zstd -q -3 -c $p; done > disk.raw.zst", d)
    for p in pieces:
        p.unlink()
    return "disk.raw.zst"


@maker("raw.gz.zst")
def _gz_in_zst(d: Path) -> str:
    _sh("gzip -1 -c disk.raw | zstd -q -1 -c > disk.raw.gz.zst", d)
    return "disk.raw.gz.zst"


EXPECT = {
    "raw.xz": (["xz"], "raw"),
    "raw.xz multi-block": (["xz"], "raw"),
    "img.gz": (["gzip"], "raw"),
    "qcow2.gz": (["gzip"], "qcow2"),
    "vmdk.zst": (["zstd"], "vmdk"),
    "raw.bz2": (["bzip2"], "raw"),
    "raw.zst multi-frame": (["zstd"], "raw"),
    "raw.gz.zst": (["zstd", "gzip"], "raw"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture, made once per module from one disk."""
    d = tmp_path_factory.mktemp("wrapped")
    pattern_disk(d / "disk.raw", DISK_SIZE, seed=41)
    out = {name: d / fn(d) for name, fn in MAKERS.items()}
    out["disk.raw"] = d / "disk.raw"
    return out


def _check(made: dict[str, Path], name: str, dst: Path, summary: dict[str, object]) -> None:
    qemu_check(dst)
    qemu_compare(made["disk.raw"], dst)
    wrappers, inner = EXPECT[name]
    assert summary["source_wrappers"] == wrappers
    assert summary["source_format"] == inner
    assert summary["virtual_size"] == DISK_SIZE
    assert summary["bytes_read"] == made[name].stat().st_size


@pytest.mark.parametrize("name", list(EXPECT))
def test_wrapped_from_file(tmp_path: Path, made: dict[str, Path], name: str) -> None:
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", str(made[name]), str(dst), "--json"))
    _check(made, name, dst, s)


@pytest.mark.parametrize("name", list(EXPECT))
def test_wrapped_from_http(tmp_path: Path, made: dict[str, Path], http: RangeHTTPServer, name: str) -> None:
    shutil.copy(made[name], tmp_path / "www" / "img")
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", http.url("/img"), str(dst), "--json"))
    _check(made, name, dst, s)
    # Read once, in order: the wrapper makes the content sequential-only.
    assert http.bytes_sent() <= made[name].stat().st_size + 64 * 1024


def test_wrapped_from_pipe(tmp_path: Path, made: dict[str, Path]) -> None:
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=made["img.gz"].read_bytes()))
    _check(made, "img.gz", dst, s)


@pytest.mark.parametrize("name", list(EXPECT))
def test_wrapped_from_s3_to_s3(
    tmp_path: Path, made: dict[str, Path], store: S3Store, bucket: str, name: str
) -> None:
    store.client().upload_file(str(made[name]), bucket, "in/disk")
    p = imgpipe("convert", f"s3://{bucket}/in/disk", f"s3://{bucket}/out.qcow2", "--json", env=store.env({}))
    s = summary_of(p)
    out = tmp_path / "out.qcow2"
    store.client().download_file(bucket, "out.qcow2", str(out))
    _check(made, name, out, s)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 GiB of zeros as 32 gzip members of 64 MiB each (about 2 MiB compressed): quick to make."""
    d = tmp_path_factory.mktemp("bomb")
    _sh("head -c 64M /dev/zero | gzip -1 -c > m.gz", d)
    member = (d / "m.gz").read_bytes()
    (d / "zeros.raw.gz").write_bytes(member * 32)
    return d / "zeros.raw.gz"


def test_bomb_over_the_ratio_is_refused(tmp_path: Path, bomb: Path) -> None:
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(bomb), str(dst), env={"IMGPIPE_MAX_DECOMPRESSION_RATIO": "100"})
    assert p.returncode == 3, p.stderr
    line = error_line(p)
    assert "gzip" in line
    assert "IMGPIPE_MAX_DECOMPRESSION_RATIO" in line
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_bomb_over_the_virtual_size_cap_is_refused(tmp_path: Path, bomb: Path) -> None:
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(bomb), str(dst), env={"IMGPIPE_MAX_VIRTUAL_SIZE": "256M"})
    assert p.returncode == 3, p.stderr
    assert "virtual-size cap" in error_line(p)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["img.gz", "raw.xz", "raw.xz multi-block", "raw.bz2", "raw.zst multi-frame"])
def test_truncated_is_refused(tmp_path: Path, made: dict[str, Path], name: str) -> None:
    data = made[name].read_bytes()
    src = tmp_path / "cut"
    src.write_bytes(data[: len(data) * 2 // 3])
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(src), str(dst))
    assert p.returncode == 3, p.stderr
    line = error_line(p)
    assert EXPECT[name][0][0] in line
    assert "truncated" in line or "corrupt" in line
    assert not dst.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["img.gz", "raw.xz", "raw.xz multi-block", "raw.bz2", "raw.zst multi-frame"])
def test_corrupt_is_refused(tmp_path: Path, made: dict[str, Path], name: str) -> None:
    data = bytearray(made[name].read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0x5A for b in data[mid : mid + 64])
    src = tmp_path / "bad"
    src.write_bytes(data)
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(src), str(dst))
    assert p.returncode == 3, p.stderr
    assert EXPECT[name][0][0] in error_line(p)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_trailing_garbage_is_refused(tmp_path: Path, made: dict[str, Path]) -> None:
    src = tmp_path / "junk.gz"
    src.write_bytes(made["img.gz"].read_bytes() + b"not a gzip member")
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(src), str(dst))
    assert p.returncode == 3, p.stderr
    assert "gzip" in error_line(p)
    assert not dst.exists()


def _zstd_frames(parts: list[bytes]) -> bytes:
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"skip!"
    c = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return skippable + b"".join(c.compress(p) for p in parts) + skippable


def _xz_blocks(data: bytes) -> bytes:
    """Multi-threaded xz: blocks whose headers carry their sizes, decoded in parallel."""
    return subprocess.run(
        ["xz", "-1", "-T2", "--block-size=64KiB", "-c"], input=data, check=True, capture_output=True
    ).stdout


@pytest.mark.parametrize("kind", ["gzip", "xz", "xz-blocks", "bzip2", "zstd"])
def test_inflaters_in_odd_pieces(kind: str) -> None:
    """Members, streams and frames cut anywhere (inside a magic, a header, a block) and output pulled
    a little at a time: the same bytes come out, and no call returns more than it was asked for."""
    rng = random.Random(kind)
    parts = [rng.randbytes(3000) + bytes(200_000) + b"text " * 4000 for _ in range(3)] + [b""]
    packers = {
        "gzip": lambda: b"".join(gzip.compress(p) for p in parts) + bytes(7),
        "xz": lambda: b"".join(lzma.compress(p) + bytes(4) for p in parts),
        # Parallel streams, then a one-block stream (the one-core decoder takes over), then padding.
        "xz-blocks": lambda: _xz_blocks(parts[0]) + bytes(8) + lzma.compress(parts[1]) + _xz_blocks(parts[2]),
        "bzip2": lambda: b"".join(bz2.compress(p) for p in parts),
        "zstd": lambda: _zstd_frames(parts),
    }
    packed = packers[kind]()
    inflater = INFLATERS[kind.split("-")[0]]()
    out = bytearray()
    pos = 0
    while pos < len(packed):
        n = rng.choice((1, 2, 3, 7, 100, 5000, 70_000))
        inflater.feed(packed[pos : pos + n])
        pos += n
        while True:
            piece = inflater.pull(128 * 1024)
            assert len(piece) <= 128 * 1024
            if not piece:
                break
            out += piece
    end = getattr(inflater, "end", None)
    if end is not None:  # decoded ahead: what it still holds
        end()
        while piece := inflater.pull(128 * 1024):
            assert len(piece) <= 128 * 1024
            out += piece
    inflater.finish()
    assert bytes(out) == b"".join(parts)


def test_xz_padding_must_be_whole_words(tmp_path: Path) -> None:
    """xz allows zero bytes between and after streams only in multiples of 4, as `xz -t` does, from the
    one-core decoder and the multi-block one alike."""
    data = bytes(range(256)) * 400
    for packed in (lzma.compress(data), _xz_blocks(data)):
        for pad, ok in ((8, True), (5, False)):
            src = tmp_path / "p.raw.xz"
            src.write_bytes(packed + bytes(pad) + packed + bytes(pad))
            dst = tmp_path / "out.raw"
            p = imgpipe("convert", str(src), str(dst), "-O", "raw")
            if ok:
                assert p.returncode == 0, p.stderr.decode()[-500:]
                assert dst.read_bytes() == data * 2
                dst.unlink()
            else:
                assert p.returncode == 3
                assert "padding" in error_line(p) or "unexpected data" in error_line(p)
                assert not dst.exists()
