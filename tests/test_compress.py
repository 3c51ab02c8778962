"""Compressed qcow2 output (--compress zlib|zstd), checked by qemu-img: it must decompress every cluster."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard

from pipeline.qcow2.writer import MAX_REFCOUNT, Qcow2Writer
from tests.helpers import MiB, error_line, imgpipe, leftovers, qemu_check, qemu_compare, qemu_info, summary_of

WORDS = b"the quick brown fox jumps over a lazy dog while qemu packs clusters".split()


def make_mixed(path: Path, size: int, seed: int) -> Path:
    """Compressible text, incompressible noise and zeros in 4 KiB blocks, so every cluster size meets
    clusters that compress, clusters that do not (stored plain), and clusters that are all zero."""
    rng = random.Random(seed)
    buf = bytearray(size)
    for off in range(0, size, 4096):
        kind = rng.random() if off else 0.0  # the first block is text: no image is all zeros
        n = min(4096, size - off)
        if kind < 0.5:
            text = b" ".join(rng.choice(WORDS) for _ in range(n // 3))
            buf[off : off + n] = text[:n].ljust(n, b".")
        elif kind < 0.7:
            buf[off : off + n] = rng.randbytes(n)
    path.write_bytes(buf)
    return path


def qemu_map(path: Path) -> list[dict[str, Any]]:
    p = subprocess.run(
        ["qemu-img", "map", "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    extents: list[dict[str, Any]] = json.loads(p.stdout)
    return extents


@pytest.mark.parametrize("algo", ["zlib", "zstd"])
@pytest.mark.parametrize(("cluster", "cs"), [("512", 512), ("4K", 4096), ("64K", 65536), ("2M", 2 * MiB)])
@pytest.mark.parametrize("size", [1000, 5 * MiB + 777])
def test_compressed_output_reads_back_identically(
    tmp_path: Path, algo: str, cluster: str, cs: int, size: int
) -> None:
    src = make_mixed(tmp_path / "disk.raw", size, seed=size + cs)
    dst = tmp_path / "out.qcow2"
    s = summary_of(
        imgpipe("convert", str(src), str(dst), "--compress", algo, "--cluster-size", cluster, "--json")
    )
    qemu_check(dst)
    qemu_compare(src, dst)  # reads, so decompresses, every cluster
    info = qemu_info(dst)
    assert info["format-specific"]["data"]["compression-type"] == algo
    assert info["cluster-size"] == cs
    assert s["compression"] == algo
    assert 0 < s["compressed_clusters"] <= s["data_clusters"]
    # qemu-img map gives no host offset for a compressed cluster: count what it sees as compressed.
    compressed = sum(e["length"] for e in qemu_map(dst) if e["data"] and "offset" not in e)
    # (a ragged last cluster shows only its part inside the virtual size)
    assert (s["compressed_clusters"] - 1) * cs < compressed <= s["compressed_clusters"] * cs
    assert leftovers(tmp_path) == []


def test_compression_shrinks_compressible_data_and_zlib_works_with_compat_0_10(tmp_path: Path) -> None:
    src = make_mixed(tmp_path / "disk.raw", 8 * MiB, seed=7)
    plain = tmp_path / "plain.qcow2"
    packed = tmp_path / "packed.qcow2"
    summary_of(imgpipe("convert", str(src), str(plain), "--json"))
    s = summary_of(
        imgpipe("convert", str(src), str(packed), "--compress", "zlib", "--compat", "0.10", "--json")
    )
    qemu_check(packed)
    qemu_compare(src, packed)
    assert qemu_info(packed)["format-specific"]["data"]["compat"] == "0.10"
    assert packed.stat().st_size < 0.75 * plain.stat().st_size
    assert s["output_size"] == packed.stat().st_size


def test_incompressible_clusters_are_stored_plain(tmp_path: Path) -> None:
    src = tmp_path / "noise.raw"
    src.write_bytes(os.urandom(3 * MiB))
    dst = tmp_path / "noise.qcow2"
    s = summary_of(imgpipe("convert", str(src), str(dst), "--compress", "zstd", "--json"))
    qemu_check(dst)
    qemu_compare(src, dst)
    assert s["compressed_clusters"] == 0
    assert s["data_clusters"] == 3 * MiB // 65536
    assert all("offset" in e for e in qemu_map(dst) if e["data"])


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("level", ["1", "9"])
def test_levels_and_threads_give_valid_images(tmp_path: Path, threads: str, level: str) -> None:
    src = make_mixed(tmp_path / "disk.raw", 6 * MiB, seed=11)
    dst = tmp_path / "out.qcow2"
    args = ["--compress", "zlib", "--compression-level", level, "--compress-threads", threads]
    summary_of(imgpipe("convert", str(src), str(dst), *args, "--json", env={"IMGPIPE_CHUNK_SIZE": "256K"}))
    qemu_check(dst)
    qemu_compare(src, dst)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--compress", "zstd", "--compat", "0.10"], "--compat 1.1"),
        (["--compress", "zlib", "-O", "raw"], "qcow2 output"),
        (["--compress", "zlib", "--compression-level", "12"], "1 to 9"),
        (["--compress", "zstd", "--compression-level", "0"], "1 to 19"),
        (["--compress", "lz4"], "invalid choice"),
    ],
)
def test_bad_compression_options_are_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    src = make_mixed(tmp_path / "disk.raw", 1 * MiB, seed=1)
    dst = tmp_path / "out.qcow2"
    proc = imgpipe("convert", str(src), str(dst), *args)
    assert proc.returncode == 2
    assert needle in error_line(proc)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_refcounts_never_overflow_when_tiny_clusters_share_a_host_cluster(tmp_path: Path) -> None:
    """2 MiB of one repeated byte compresses to ~80 bytes: tens of thousands of such clusters would share
    one host cluster and overflow its 16-bit refcount unless the writer starts a new host cluster."""
    cs = 2 * MiB
    frame = zstandard.ZstdCompressor(level=19).compress(b"a" * cs)  # real frames for the first clusters...
    w = Qcow2Writer(cs, "1.1", "zstd")
    out: list[bytes | memoryview] = []
    n = MAX_REFCOUNT + 1000
    for i in range(n):
        w.add_compressed(i * cs, frame if i < 4 else b"\x00" * 16, out)  # ...then 16-byte stand-ins
    # Host cluster 0 is the header; 1 fills up to the cap, the rest move on to cluster 2.
    assert w.rc is not None
    assert list(w.rc) == [1, MAX_REFCOUNT, n - MAX_REFCOUNT]
    tail = w.finish(n * cs)
    img = tmp_path / "many.qcow2"
    with img.open("wb") as f:
        f.write(bytes(cs))
        for piece in [*out, *tail.metadata]:
            f.write(piece)
        f.seek(0)
        f.write(tail.header)
    assert img.stat().st_size == tail.output_size
    qemu_check(img)  # refcounts match the references: no overflow, no leak
    # The real frames decompress to the pattern (qemu-io exits 0 either way: read its report).
    p = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read -P 0x61 {cs} {cs}", str(img)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Pattern verification failed" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "read 2097152/2097152 bytes" in p.stdout, p.stdout + p.stderr
