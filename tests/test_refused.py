"""Formats recognised but not converted yet are refused by name (exit 3), never copied as raw.

Compressed wrappers (gzip, xz, bzip2, zstd) are peeled and converted: tests/test_wrappers.py.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.formats.registry import DECODERS
from tests.helpers import MiB, error_line, imgpipe, leftovers, make_raw


def _qemu_create(tmp_path: Path, fmt: str, *opts: str) -> Path:
    raw = make_raw(tmp_path / "base.raw", 3 * MiB, seed=1)
    out = tmp_path / f"img.{fmt}"
    subprocess.run(
        ["qemu-img", "convert", "-O", fmt, *opts, str(raw), str(out)], check=True, capture_output=True
    )
    raw.unlink()
    return out


QEMU_FORMATS = [
    ("qcow2", (), "qcow2"),
    ("qcow2", ("-o", "compat=0.10"), "qcow2"),
    ("vmdk", (), "vmdk"),
    ("vmdk", ("-o", "subformat=streamOptimized"), "vmdk"),
    ("vpc", (), "vhd"),
    ("vpc", ("-o", "subformat=fixed"), "vhd"),
    ("vhdx", (), "vhdx"),
    ("vdi", (), "vdi"),
    ("qed", (), "qed"),
    ("parallels", (), "parallels"),
]
# Formats that have a decoder convert (tests/test_fmt_*.py); the rest must still be refused by name.
QEMU_FORMATS = [f for f in QEMU_FORMATS if f[2] not in DECODERS]


@pytest.mark.parametrize(
    ("fmt", "opts", "named"), QEMU_FORMATS, ids=[f"{f}{''.join(o)}" for f, o, _ in QEMU_FORMATS]
)
def test_recognised_formats_are_refused_by_name(
    tmp_path: Path, fmt: str, opts: tuple[str, ...], named: str
) -> None:
    img = _qemu_create(tmp_path, fmt, *opts)
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", str(img), str(dst))
    assert p.returncode == 3, p.stderr
    line = error_line(p)
    assert f"is a {named}" in line
    assert "does not convert" in line
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_tail_only_format_from_a_pipe_is_refused_at_eof(tmp_path: Path) -> None:
    """A format known only by its last bytes (an Apple DMG's "koly" trailer) is seen from a pipe only
    at EOF: refused then, before anything is committed. (A fixed VHD's footer, at the same place, is
    trimmed and converted: tests/test_fmt_vhd.py.)"""
    raw = make_raw(tmp_path / "base.raw", 3 * MiB, seed=4)
    img = tmp_path / "img.dmg"
    img.write_bytes(raw.read_bytes() + b"koly" + bytes(508))
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", "-", str(dst), stdin=img.read_bytes())
    assert p.returncode == 3
    assert "dmg" in error_line(p)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_luks_is_refused(tmp_path: Path) -> None:
    # A LUKS1 header: magic, version 1, cipher "aes", mode "xts-plain64", hash "sha256". Built by hand
    # because qemu-img's key-stretching benchmark fails on loaded machines.
    hdr = bytearray(4 * MiB)
    hdr[0:8] = b"LUKS\xba\xbe\x00\x01"
    hdr[8:11] = b"aes"
    hdr[40:51] = b"xts-plain64"
    hdr[72:78] = b"sha256"
    out = tmp_path / "img.luks"
    out.write_bytes(hdr)
    p = imgpipe("convert", str(out), str(tmp_path / "o.qcow2"))
    assert p.returncode == 3
    assert "is a luks" in error_line(p)


def _tar_bytes() -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tf:
        data = b"x" * 5000
        info = tarfile.TarInfo("notes.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return bio.getvalue()


def test_tar_without_a_disk_is_refused(tmp_path: Path) -> None:
    """A tar is read as a package (tests/test_packages.py); one with no OVF and no member named like a
    disk image is refused, bare or inside a compressed wrapper, and never copied as a raw disk."""
    for name, data in (("packed.tar", _tar_bytes()), ("packed.tar.gz", gzip.compress(_tar_bytes()))):
        src = tmp_path / name
        src.write_bytes(data)
        dst = tmp_path / "o.qcow2"
        p = imgpipe("convert", str(src), str(dst))
        assert p.returncode == 3
        line = error_line(p)
        assert "holds no disk image" in line
        assert "notes.txt" in line
        assert not dst.exists()


def test_iso_carrying_a_qcow2_header_is_ambiguous(tmp_path: Path) -> None:
    """An ISO whose system area holds a qcow2 header: one tool would boot it, another open a qcow2."""
    img = _qemu_create(tmp_path, "qcow2")
    data = bytearray(img.read_bytes())
    data.extend(bytes(max(0, 0x9000 - len(data))))
    data[0x8001:0x8006] = b"CD001"
    img.write_bytes(data)
    dst = tmp_path / "o.qcow2"
    p = imgpipe("convert", str(img), str(dst))
    assert p.returncode == 3
    line = error_line(p)
    assert "more than one format" in line
    assert "iso" in line
    assert "qcow2" in line
    assert not dst.exists()
