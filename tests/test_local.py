"""Conversions between local files, stdin and stdout, checked by qemu-img."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REAL_DATA,
    ROOT,
    MiB,
    error_line,
    imgpipe,
    leftovers,
    make_raw,
    qemu_check,
    qemu_compare,
    qemu_info,
    summary_of,
)

SIZES = [0, 512, 1000, 3 * MiB + 5, 9 * MiB]
CLUSTERS = ["512", "4K", "64K", "2M"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_sizes_and_cluster_sizes(tmp_path: Path, size: int, cluster: str) -> None:
    src = make_raw(tmp_path / "disk.raw", size, seed=size)
    dst = tmp_path / "out.qcow2"
    compat = "0.10" if size % 2 else "1.1"
    s = summary_of(
        imgpipe("convert", str(src), str(dst), "--cluster-size", cluster, "--compat", compat, "--json")
    )
    qemu_check(dst)
    qemu_compare(src, dst)
    info = qemu_info(dst)
    cs = {"512": 512, "4K": 4096, "64K": 65536, "2M": 2 * MiB}[cluster]
    assert info["cluster-size"] == cs
    assert info["virtual-size"] == -(-size // 512) * 512
    assert info["format-specific"]["data"]["compat"] == compat
    assert s["source_format"] == "raw"
    assert s["bytes_read"] == size
    assert s["output_size"] == dst.stat().st_size
    assert leftovers(tmp_path) == []


def test_all_zero_image_allocates_no_data(tmp_path: Path) -> None:
    src = tmp_path / "zero.raw"
    src.write_bytes(bytes(16 * MiB))
    dst = tmp_path / "zero.qcow2"
    s = summary_of(imgpipe("convert", str(src), str(dst), "--json"))
    qemu_check(dst)
    qemu_compare(src, dst)
    assert s["data_clusters"] == 0
    assert s["zero_bytes_skipped"] == 16 * MiB
    assert dst.stat().st_size < 512 * 1024


def test_all_data_image_allocates_every_cluster(tmp_path: Path) -> None:
    src = tmp_path / "data.raw"
    src.write_bytes(os.urandom(10 * MiB + 4096))
    dst = tmp_path / "data.qcow2"
    s = summary_of(imgpipe("convert", str(src), str(dst), "--json"))
    qemu_check(dst)
    qemu_compare(src, dst)
    assert s["data_clusters"] == -(-(10 * MiB + 4096) // 65536)
    assert s["zero_bytes_skipped"] == 0


def test_raw_output_to_file_is_identical_and_sparse(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "d.raw", 12 * MiB + 7, seed=3, data_fraction=0.05)
    dst = tmp_path / "copy.raw"
    summary_of(imgpipe("convert", str(src), str(dst), "-O", "raw", "--json"))
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < src.stat().st_size  # zero runs became holes


def _genisoimage(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "hello.txt").write_text("hello\n" * 1000)
    (tree / "dir" / "blob.bin").write_bytes(os.urandom(300 * 1024))
    iso = tmp_path / "image.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-R", "-J", "-o", str(iso), str(tree)], check=True, capture_output=True
    )
    return iso


@pytest.mark.skipif(shutil.which("genisoimage") is None, reason="genisoimage not installed")
def test_iso_input(tmp_path: Path) -> None:
    iso = _genisoimage(tmp_path)
    dst = tmp_path / "iso.qcow2"
    s = summary_of(imgpipe("convert", str(iso), str(dst), "--json"))
    assert s["source_format"] == "iso"
    qemu_check(dst)
    qemu_compare(iso, dst)


@pytest.mark.parametrize("name", ["genisoimage-level3.iso", "mkisofs-2012.iso"])
def test_real_isos(tmp_path: Path, name: str) -> None:
    src = REAL_DATA / name
    if not src.exists():
        pytest.skip(f"{src} not present (only CI and developers have ../shared/testdata/real)")
    dst = tmp_path / "real.qcow2"
    s = summary_of(imgpipe("convert", str(src), str(dst), "--json"))
    assert s["source_format"] == "iso"
    qemu_check(dst)
    qemu_compare(src, dst, fmt_a="raw")


def test_hybrid_iso_with_gpt_is_not_ambiguous(tmp_path: Path) -> None:
    iso = tmp_path / "hybrid.iso"
    data = bytearray(make_raw(tmp_path / "base", 2 * MiB, seed=9).read_bytes())
    data[512:520] = b"EFI PART"
    data[0x8001:0x8006] = b"CD001"
    iso.write_bytes(data)
    dst = tmp_path / "hybrid.qcow2"
    s = summary_of(imgpipe("convert", str(iso), str(dst), "--json"))
    assert s["source_format"] == "iso"
    qemu_compare(iso, dst, fmt_a="raw")


def test_stdin_regular_file_to_file(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", 5 * MiB + 100, seed=5)
    dst = tmp_path / "out.qcow2"
    with src.open("rb") as f:
        s = summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=f.fileno()))
    assert s["bytes_read"] == src.stat().st_size
    qemu_check(dst)
    qemu_compare(src, dst)


def test_stdin_pipe_to_file(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", 7 * MiB + 3, seed=6)
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=src.read_bytes()))
    assert s["bytes_read"] == src.stat().st_size
    qemu_check(dst)
    qemu_compare(src, dst)


def test_raw_to_stdout(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", 6 * MiB + 11, seed=7)
    p = imgpipe("convert", str(src), "-", "-O", "raw", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert p.stdout == src.read_bytes()


def test_qcow2_to_stdout_is_refused(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", MiB)
    p = imgpipe("convert", str(src), "-")
    assert p.returncode == 2
    assert "qcow2 cannot be written to a pipe" in error_line(p)
    assert p.stdout == b""


def test_qcow2_to_fifo_is_refused(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", MiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = imgpipe("convert", str(src), str(fifo))
    assert p.returncode == 2
    assert "not a regular file" in error_line(p)


def test_existing_destination_replaced_atomically(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", 2 * MiB, seed=8)
    dst = tmp_path / "out.qcow2"
    dst.write_bytes(b"old contents")
    summary_of(imgpipe("convert", str(src), str(dst), "--json"))
    qemu_compare(src, dst)
    assert oct(dst.stat().st_mode & 0o777) != oct(0o600)


def test_failure_mid_job_leaves_no_file(tmp_path: Path) -> None:
    """A sequential source that turns out, at EOF, to be a fixed VHD: the job dies after writing."""
    data = bytearray(make_raw(tmp_path / "base", 9 * MiB, seed=2).read_bytes())
    data[-512:-504] = b"conectix"
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", "-", str(dst), stdin=bytes(data))
    assert p.returncode == 3, p.stderr
    assert "vhd" in error_line(p)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_virtual_size_cap_mid_stream(tmp_path: Path) -> None:
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", "-", str(dst), stdin=os.urandom(9 * MiB), env={"IMGPIPE_MAX_VIRTUAL_SIZE": "4M"})
    assert p.returncode == 3
    assert "virtual-size cap" in error_line(p)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_missing_source_is_exit_1(tmp_path: Path) -> None:
    p = imgpipe("convert", str(tmp_path / "nope.raw"), str(tmp_path / "o.qcow2"))
    assert p.returncode == 1
    assert "no such file" in error_line(p)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cluster-size", "1000"], "--cluster-size must be a power of two"),
        (["--cluster-size", "4M"], "--cluster-size must be a power of two"),
        (["--compat", "2"], "invalid choice"),
        (["--part-size", "1M"], "--part-size must be between 5M and 5G"),
    ],
)
def test_bad_usage_is_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    src = make_raw(tmp_path / "in.raw", MiB)
    p = imgpipe("convert", str(src), str(tmp_path / "o.qcow2"), *args)
    assert p.returncode == 2
    assert needle in error_line(p)
    assert not (tmp_path / "o.qcow2").exists()


def test_missing_destination_directory_is_usage_error(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "in.raw", MiB)
    p = imgpipe("convert", str(src), str(tmp_path / "no" / "such" / "o.qcow2"))
    assert p.returncode == 2
    assert "does not exist" in error_line(p)


def test_sigkill_mid_job_leaves_nothing_beside_the_destination(tmp_path: Path) -> None:
    """The output is an unnamed file until it is complete: even SIGKILL, which no cleanup code survives,
    leaves no partial file (a named temporary would stay behind)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "disk.qcow2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "convert", "-", str(dst), "--no-progress"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    proc.stdin.write(os.urandom(4 * MiB))  # data on its way to the destination, the rest never comes
    proc.stdin.flush()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        "/out/" in os.readlink(f) for f in Path(f"/proc/{proc.pid}/fd").iterdir() if f.is_symlink()
    ):
        time.sleep(0.05)
    assert any("/out/" in os.readlink(f) for f in Path(f"/proc/{proc.pid}/fd").iterdir()), "no output open"
    proc.kill()
    proc.wait(10)
    proc.stdin.close()
    assert proc.stderr is not None
    proc.stderr.close()
    assert list(out_dir.iterdir()) == []


def test_output_file_gets_the_umask_mode(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "d.raw", MiB, seed=4)
    dst = tmp_path / "d.qcow2"
    umask = os.umask(0o027)
    try:
        summary_of(imgpipe("convert", str(src), str(dst), "--json"))
    finally:
        os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o640
