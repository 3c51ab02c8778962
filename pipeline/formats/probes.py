"""Probes for every format a cloud operator meets, decodable or not.

Recognising a format we cannot convert yet matters as much as converting the ones we can: an
unrecognised qcow2 or VMDK would otherwise be "converted" as raw, silently producing a disk that
holds an image file instead of a filesystem.
"""

from __future__ import annotations

import struct

from pipeline.errors import NotThisFormat
from pipeline.formats.base import Match, Probe

VHD_FOOTER = 512
ISO_DESCRIPTOR_OFFSETS = (0x8001, 0x8801, 0x9001)  # volume descriptors at sectors 16, 17, 18


def _magic(data: bytes, offset: int, magic: bytes) -> bool:
    return data.startswith(magic, offset)


class SimpleMagic(Probe):
    """A format recognised by fixed bytes at a fixed offset from the start."""

    def __init__(self, name: str, offset: int, magic: bytes, detail: str = "") -> None:
        self.name = name
        self.offset = offset
        self.magic = magic
        self.detail = detail
        self.head = offset + len(magic)

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if not _magic(head, self.offset, self.magic):
            raise NotThisFormat
        return Match(self.name, self.detail)


class Qcow2Probe(Probe):
    name = "qcow2"
    head = 8

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if not _magic(head, 0, b"QFI\xfb"):
            raise NotThisFormat
        version = struct.unpack_from(">I", head, 4)[0] if len(head) >= 8 else 0
        return Match("qcow2", f"version {version}")


class VmdkProbe(Probe):
    name = "vmdk"
    head = 1024

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if _magic(head, 0, b"KDMV"):
            return Match("vmdk", "hosted sparse extent")
        if _magic(head, 0, b"COWD"):
            return Match("vmdk", "ESX sparse extent")
        if _magic(head, 0, b"\xbe\xba\xfe\xca"):
            return Match("vmdk", "seSparse extent")
        text = head[:1024]
        if text.startswith(b"#") and b"Disk DescriptorFile" in text:
            return Match("vmdk", "descriptor")
        raise NotThisFormat


class VhdProbe(Probe):
    """Dynamic VHDs carry a footer copy at 0; fixed ones only the footer in their last 512 bytes."""

    name = "vhd"
    head = 8
    tail = VHD_FOOTER

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if _magic(head, 0, b"conectix"):
            return Match("vhd", "dynamic or differencing")
        if tail is not None and len(tail) >= VHD_FOOTER and _magic(tail, len(tail) - VHD_FOOTER, b"conectix"):
            return Match("vhd", "fixed")
        raise NotThisFormat


class DmgProbe(Probe):
    name = "dmg"
    tail = 512

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if tail is not None and len(tail) >= 512 and _magic(tail, len(tail) - 512, b"koly"):
            return Match("dmg", "Apple disk image")
        raise NotThisFormat


class Bzip2Probe(Probe):
    name = "bzip2"
    head = 10

    @staticmethod
    def matches(head: bytes) -> bool:
        # "BZh" + level digit + the block magic (BCD pi), or an empty stream's end-of-stream magic.
        magics = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
        return len(head) >= 10 and head[:3] == b"BZh" and 0x31 <= head[3] <= 0x39 and head[4:10] in magics

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if self.matches(head):
            return Match("bzip2", "compressed")
        raise NotThisFormat


class IsoProbe(Probe):
    name = "iso"
    head = max(ISO_DESCRIPTOR_OFFSETS) + 5
    decodable = True

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        for off in ISO_DESCRIPTOR_OFFSETS:
            if _magic(head, off, b"CD001"):
                return Match("iso", "ISO 9660")
        for off in ISO_DESCRIPTOR_OFFSETS:
            if any(_magic(head, off, m) for m in (b"BEA01", b"NSR02", b"NSR03")):
                return Match("iso", "UDF")
        raise NotThisFormat


class GptProbe(Probe):
    """A partitioned raw disk; only a marker, so a hybrid ISO (ISO + GPT) is not ambiguous."""

    name = "gpt"
    head = 4096 + 8
    decodable = True

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if _magic(head, 512, b"EFI PART") or _magic(head, 4096, b"EFI PART"):
            return Match("raw", "GPT partitioned disk", marker=True)
        raise NotThisFormat


class KernelProbe(Probe):
    """A bare Linux kernel (an AKI): copied unchanged, never made into a disk."""

    name = "kernel"
    head = 0x240

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if _magic(head, 0x202, b"HdrS") and _magic(head, 0x1FE, b"\x55\xaa"):
            return Match("kernel", "Linux x86 boot image")
        if _magic(head, 0x38, b"ARM\x64"):
            return Match("kernel", "Linux arm64 Image")
        if _magic(head, 0x38, b"RSC\x05"):
            return Match("kernel", "Linux riscv Image")
        raise NotThisFormat


class CpioProbe(Probe):
    """An initramfs (an ARI): a cpio archive, copied unchanged. A compressed one is recognised by the
    unwrap stage, which looks inside the compression without peeling it."""

    name = "ramdisk"
    head = 6

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        if head[:6] in CPIO_MAGICS:
            return Match("ramdisk", "cpio initramfs")
        raise NotThisFormat


class OvfProbe(Probe):
    """An OVF descriptor given as SRC: its disks are read as objects beside it."""

    name = "ovf"
    head = 4096

    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
        if text.startswith(b"<") and b"Envelope" in head and b"dmtf.org/ovf/envelope" in head:
            return Match("ovf", "OVF descriptor")
        raise NotThisFormat


CPIO_MAGICS = (b"070701", b"070702", b"070707")

PROBES: tuple[Probe, ...] = (
    Qcow2Probe(),
    SimpleMagic("qed", 0, b"QED\x00"),
    VmdkProbe(),
    VhdProbe(),
    SimpleMagic("vhdx", 0, b"vhdxfile"),
    SimpleMagic("vdi", 0x40, b"\x7f\x10\xda\xbe"),
    SimpleMagic("luks", 0, b"LUKS\xba\xbe", "encrypted volume"),
    SimpleMagic("parallels", 0, b"WithoutFreeSpace"),
    SimpleMagic("parallels", 0, b"WithouFreSpacExt"),
    SimpleMagic("bochs", 0, b"Bochs Virtual HD Image"),
    SimpleMagic("cloop", 0, b"#!/bin/sh\n#V2.0 Format"),
    DmgProbe(),
    SimpleMagic("gzip", 0, b"\x1f\x8b\x08", "compressed"),
    SimpleMagic("xz", 0, b"\xfd7zXZ\x00", "compressed"),
    Bzip2Probe(),
    SimpleMagic("zstd", 0, b"\x28\xb5\x2f\xfd", "compressed"),
    SimpleMagic("tar", 257, b"ustar", "archive"),
    KernelProbe(),
    CpioProbe(),
    OvfProbe(),
    IsoProbe(),
    GptProbe(),
)

DECODABLE = frozenset({"raw", "iso"})
# Archives whose members are converted (pipeline/package): an OVA, a UEC tarball, a disk in a tar;
# and an OVF descriptor whose disks lie beside it.
PACKAGES = frozenset({"tar", "ovf"})
# Copied unchanged, with their kind: a kernel (AKI) and an initramfs (ARI).
COPIED = frozenset({"kernel", "ramdisk"})
# Compressed streams: peeled by the unwrap stage (pipeline/unwrap.py), never decoded as a disk.
WRAPPERS = frozenset({"gzip", "xz", "bzip2", "zstd"})
HEAD_BYTES = max(p.head for p in PROBES)
TAIL_BYTES = max(p.tail for p in PROBES)
