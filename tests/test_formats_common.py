"""What every sparse-format decoder owes, checked the same way for each format qemu-img can make.

- ranged (HTTP with Range): header and tables with a few reads, the data once, coalesced: bytes fetched
  within 5 % of the file, and far fewer requests than data clusters;
- sequential (HTTP without Range, stdin): one pass, same output;
- `imgpipe info` names the format and the virtual size without fetching the image;
- the output passes `qemu-img check` and `qemu-img compare` against the raw disk it was made from.
Each format's own subformats and refusals are in tests/test_fmt_<format>.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from servers import RangeHTTPServer

from pipeline.formats.registry import DECODERS
from tests.helpers import KiB, MiB, imgpipe, pattern_disk, qemu_check, qemu_compare, summary_of

# name: (sniffed format, qemu-img -O format, options)
FORMATS = {
    "qcow2": ("qcow2", "qcow2", []),
    "qcow2-zstd": ("qcow2", "qcow2", ["-c", "-o", "compression_type=zstd"]),
    "vmdk-sparse": ("vmdk", "vmdk", ["-o", "subformat=monolithicSparse"]),
    "vmdk-stream": ("vmdk", "vmdk", ["-o", "subformat=streamOptimized"]),
    "vhd-dynamic": ("vhd", "vpc", ["-o", "subformat=dynamic"]),
    "vhd-fixed": ("vhd", "vpc", ["-o", "subformat=fixed"]),
    "vhdx": ("vhdx", "vhdx", ["-o", "subformat=dynamic"]),
    "vdi": ("vdi", "vdi", []),
}
SIZE = 24 * MiB + 512  # odd on purpose; VHD rounds to its CHS geometry, so compare against qemu's reading


def _skip_unless_decodable(name: str) -> None:
    if FORMATS[name][0] not in DECODERS:
        pytest.skip(f"no {FORMATS[name][0]} decoder registered yet")


def _build(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(image in the served directory, raw disk as qemu-img reads the image)."""
    _, qfmt, opts = FORMATS[name]
    raw = pattern_disk(tmp_path / "disk.raw", SIZE, seed=sum(name.encode()))
    img = tmp_path / "www" / f"disk.{name}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", qfmt, *opts, str(raw), str(img)], check=True)
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", qfmt, "-O", "raw", str(img), str(expected)], check=True)
    return img, expected


@pytest.mark.parametrize("name", list(FORMATS))
def test_ranged_reads_fetch_the_file_once(tmp_path: Path, http: RangeHTTPServer, name: str) -> None:
    _skip_unless_decodable(name)
    img, expected = _build(tmp_path, name)
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", http.url(f"/{img.name}"), str(dst), "--json"))
    assert s["source_format"] == FORMATS[name][0]
    qemu_check(dst)
    qemu_compare(expected, dst)
    size = img.stat().st_size
    assert s["source_bytes_fetched"] <= size * 1.05 + 64 * KiB, (s["source_bytes_fetched"], size)
    gets = [r for r in http.log if r.method == "GET"]
    assert all(r.range for r in gets)
    assert len(gets) < max(8, s["data_clusters"] // 4), (len(gets), s["data_clusters"])


@pytest.mark.parametrize("name", list(FORMATS))
def test_sequential_sources_convert_in_one_pass(tmp_path: Path, http: RangeHTTPServer, name: str) -> None:
    _skip_unless_decodable(name)
    img, expected = _build(tmp_path, name)
    dst = tmp_path / "out.qcow2"
    summary_of(imgpipe("convert", http.url(f"/norange/{img.name}"), str(dst), "--json"))
    assert http.request_count() == 1
    qemu_check(dst)
    qemu_compare(expected, dst)
    dst.unlink()
    with img.open("rb") as f, subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE) as pipe:
        assert pipe.stdout is not None  # a real pipe: no size, no seeking
        s = summary_of(imgpipe("convert", "-", str(dst), "--json", stdin=pipe.stdout.fileno()))
    assert s["source_format"] == FORMATS[name][0]
    qemu_compare(expected, dst)


@pytest.mark.parametrize("name", list(FORMATS))
def test_info_names_format_and_size(tmp_path: Path, http: RangeHTTPServer, name: str) -> None:
    _skip_unless_decodable(name)
    img, expected = _build(tmp_path, name)
    d = summary_of(imgpipe("info", http.url(f"/{img.name}"), "--json"))
    assert d["format"] == FORMATS[name][0]
    assert d["verdict"] == "accepted"
    assert d["virtual_size"] == expected.stat().st_size
    if name != "vhd-fixed":  # a fixed VHD's "table" is the whole disk
        assert d["source_bytes_fetched"] < img.stat().st_size / 2 + 2 * MiB
