"""qcow2 input: every subformat qemu-img makes, from a file, HTTP (ranged and not), stdin and S3.

qemu-img builds each image from a raw disk with a known pattern and is the oracle (compare, check).
The ranged tests count what the server sent: a decoder reads its tables with a few ranged reads and
the data once, so the bytes fetched stay within 5 % of the file.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

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


def qcow2(raw: Path, out: Path, *opts: str) -> Path:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw), str(out)],
        check=True,
        capture_output=True,
    )
    return out


VARIANTS = {
    "v3-64k": (),
    "v2-4k": ("-o", "compat=0.10,cluster_size=4k"),
    "v3-512b": ("-o", "cluster_size=512"),
    "v3-2m": ("-o", "cluster_size=2M"),
    "zlib": ("-c",),
    "zlib-v2": ("-c", "-o", "compat=0.10"),
    "zstd": ("-c", "-o", "compression_type=zstd"),
    "zstd-16k": ("-c", "-o", "compression_type=zstd,cluster_size=16k"),
    "extended-l2": ("-o", "extended_l2=on,cluster_size=128k"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qcow2_variants_from_file(tmp_path: Path, variant: str) -> None:
    size = 13 * MiB + 3 * 512 if variant != "v3-2m" else 9 * MiB + 512
    raw = pattern_disk(tmp_path / "disk.raw", size, seed=len(variant))
    img = qcow2(raw, tmp_path / "in.qcow2", *VARIANTS[variant])
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", str(img), str(dst), "--json"))
    assert s["source_format"] == "qcow2"
    assert s["virtual_size"] == size
    qemu_check(dst)
    qemu_compare(raw, dst)


def test_subclusters_zero_flags_dirty_bit_and_snapshots(tmp_path: Path) -> None:
    """Extended L2 with partly allocated and zeroed subclusters, v3 zero flags on allocated clusters,
    an internal snapshot (only the active view is read) and the dirty bit (tolerated)."""
    raw = pattern_disk(tmp_path / "disk.raw", 6 * MiB, seed=3)
    for opts in ("extended_l2=on,cluster_size=64k", "cluster_size=64k"):
        img = qcow2(raw, tmp_path / "in.qcow2", "-o", opts)
        subprocess.run(["qemu-img", "snapshot", "-c", "before", str(img)], check=True)
        io_cmds = [
            "write -P 0xab 8k 4k",  # one subcluster of a cluster, its neighbours untouched
            "write -z 1M 64k",  # zero flag on an allocated cluster
            "write -z 2052k 8k",  # zeroed subclusters inside a data cluster
            "write -P 0x5c 5M 100k",
        ]
        for cmd in io_cmds:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(img)], check=True, capture_output=True)
        with img.open("r+b") as f:  # the dirty bit: incompatible feature bit 0, header offset 72
            f.seek(72)
            (features,) = struct.unpack(">Q", f.read(8))
            f.seek(72)
            f.write(struct.pack(">Q", features | 1))
        expected = tmp_path / "expected.raw"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(img), str(expected)], check=True, capture_output=True
        )
        dst = tmp_path / "out.qcow2"
        summary_of(imgpipe("convert", str(img), str(dst), "--json"))
        qemu_check(dst)
        qemu_compare(expected, dst)
        dst.unlink()


@pytest.mark.parametrize("variant", ["v3-64k", "zlib", "extended-l2"])
def test_ranged_http_fetches_each_byte_once(tmp_path: Path, http: RangeHTTPServer, variant: str) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 40 * MiB + 512, seed=7)
    img = qcow2(raw, tmp_path / "www" / "in.qcow2", *VARIANTS[variant])
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", http.url("/in.qcow2"), str(dst), "--json"))
    qemu_check(dst)
    qemu_compare(raw, dst)
    size = img.stat().st_size
    gets = [r for r in http.log if r.method == "GET"]
    assert all(r.range for r in gets), "every GET is ranged"
    assert all(r.if_match for r in gets[1:]), "ranges are pinned to the ETag"
    # The data once, plus the head, tail, L1 and L2 tables: within 5 % of the file.
    assert http.bytes_sent() <= size * 1.05 + 64 * KiB, (http.bytes_sent(), size)
    assert s["source_bytes_fetched"] == http.bytes_sent()
    # Coalesced: at most one request per 2 MiB guest window (plus the tables), not one per cluster.
    clusters = s["data_clusters"]
    assert len(gets) <= -(-s["virtual_size"] // (2 * MiB)) + 6 < clusters, (len(gets), clusters)


@pytest.mark.parametrize("variant", ["v3-64k", "zstd", "v2-4k"])
def test_sequential_sources_one_pass(tmp_path: Path, http: RangeHTTPServer, variant: str) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 17 * MiB + 1024, seed=9)
    img = qcow2(raw, tmp_path / "www" / "in.qcow2", *VARIANTS[variant])
    dst = tmp_path / "out.qcow2"
    summary_of(imgpipe("convert", http.url("/norange/in.qcow2"), str(dst), "--json"))
    qemu_check(dst)
    qemu_compare(raw, dst)
    assert http.request_count() == 1
    dst.unlink()
    summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=img.read_bytes()))
    qemu_compare(raw, dst)


def _map(img: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(img)], check=True, capture_output=True, text=True
    )
    entries: list[dict[str, Any]] = json.loads(out.stdout)
    return entries


def _reverse_written(tmp_path: Path, size: int) -> tuple[Path, Path]:
    """A qcow2 whose clusters were written last-first: file order is the reverse of guest order, and
    each L2 table follows data it maps."""
    img = tmp_path / "rev.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(img), str(size)], check=True, capture_output=True
    )
    cmds: list[str] = []
    for k in reversed(range(0, size // (256 * KiB))):
        cmds += ["-c", f"write -P {k % 250 + 1} {k * 256 * KiB} 256k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True, capture_output=True)
    expected = tmp_path / "rev.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(img), str(expected)], check=True, capture_output=True
    )
    return img, expected


def test_out_of_order_layout_needs_the_reorder_window(tmp_path: Path) -> None:
    img, expected = _reverse_written(tmp_path, 8 * MiB)
    dst = tmp_path / "out.qcow2"
    # Sequentially, the whole image must be held to be put back in guest order: fine within the window ...
    summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=img.read_bytes()))
    qemu_check(dst)
    qemu_compare(expected, dst)
    dst.unlink()
    # ... refused, naming the remedies, when the window is too small ...
    p = imgpipe("convert", "-", str(dst), stdin=img.read_bytes(), env={"IMGPIPE_REORDER_BUFFER": "1M"})
    assert p.returncode == 3, p.stderr
    line = error_line(p)
    assert "range-capable source" in line
    assert "IMGPIPE_REORDER_BUFFER" in line
    assert not dst.exists()
    assert leftovers(tmp_path) == []
    # ... and a ranged source reads it in guest order whatever the window.
    summary_of(imgpipe("convert", str(img), str(dst), "--json", env={"IMGPIPE_REORDER_BUFFER": "1M"}))
    qemu_compare(expected, dst)


def test_s3_to_s3_compressed_qcow2(tmp_path: Path, store: S3Store, bucket: str) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 11 * MiB + 512, seed=5)
    img = qcow2(raw, tmp_path / "in.qcow2", "-c")
    store.client().upload_file(str(img), bucket, "in.qcow2")
    s = summary_of(
        imgpipe("convert", f"s3://{bucket}/in.qcow2", f"s3://{bucket}/out.qcow2", "--json", env=store.env())
    )
    assert s["source_bytes_fetched"] <= img.stat().st_size * 1.05 + 64 * KiB
    out = tmp_path / "out.qcow2"
    store.client().download_file(bucket, "out.qcow2", str(out))
    qemu_check(out)
    qemu_compare(raw, out)


def test_info_reads_only_the_tables(tmp_path: Path, http: RangeHTTPServer) -> None:
    raw = pattern_disk(tmp_path / "disk.raw", 64 * MiB, seed=2)
    img = qcow2(raw, tmp_path / "www" / "in.qcow2", "-c", "-o", "compression_type=zstd")
    p = imgpipe("info", http.url("/in.qcow2"), "--json")
    assert p.returncode == 0, p.stderr
    d = summary_of(p)
    assert (d["format"], d["subformat"], d["virtual_size"]) == ("qcow2", "v3", 64 * MiB)
    assert d["details"]["compression_type"] == "zstd"
    assert d["verdict"] == "accepted"
    assert "no backing file" in d["checks"]
    allocated = sum(e["length"] for e in _map(img) if e["data"])
    assert d["allocated_size"] == allocated
    assert http.bytes_sent() < 3 * MiB  # the first response, the tail, the L2 table: not the image
    backing = tmp_path / "www" / "delta.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", str(img), "-F", "qcow2", str(backing)],
        check=True,
        capture_output=True,
    )
    p = imgpipe("info", http.url("/delta.qcow2"), "--json")
    assert p.returncode == 3
    assert "backing file" in error_line(p)
    assert summary_of_refused(p)["verdict"] == "refused"


def summary_of_refused(p: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    out: dict[str, object] = json.loads(p.stdout.decode().strip().splitlines()[-1])
    return out
