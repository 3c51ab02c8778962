"""The qcow2 header (docs/interop/qcow2.rst in qemu), as one struct and a frozen dataclass.

Version 2 headers are the first 72 bytes; version 3 adds feature bits, the refcount order and the
header length, and since qemu 5.1 a compression type byte (header length 112 with padding).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
V2_LENGTH = 72
V3_LENGTH = 112  # with the compression type byte and 7 bytes of padding to a multiple of 8

# Field order and sizes exactly as on disk; offsets named once, here.
_STRUCT = struct.Struct(">4sIQIIQIIQQIIQQQQIIB7x")
assert _STRUCT.size == V3_LENGTH

OFLAG_COPIED = 1 << 63  # refcount is exactly 1: written in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
INCOMPAT_COMPRESSION = 1 << 3  # compression_type is not zlib
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = REFCOUNT_ORDER
    header_length: int = V3_LENGTH
    compression_type: int = 0

    def to_bytes(self) -> bytes:
        raw = _STRUCT.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
            self.compression_type,
        )
        if self.version == 2:
            return raw[:V2_LENGTH] + bytes(8)  # then the header-extension end marker
        return raw[: self.header_length] + bytes(8)

    @classmethod
    def from_bytes(cls, data: bytes) -> Qcow2Header:
        if len(data) < V2_LENGTH:
            raise ValueError("qcow2 header is shorter than 72 bytes")
        padded = data[:V3_LENGTH].ljust(V3_LENGTH, b"\0")
        f = _STRUCT.unpack(padded)
        if f[0] != MAGIC:
            raise ValueError("not a qcow2 header")
        version = f[1]
        v3 = version >= 3
        return cls(
            version=version,
            backing_file_offset=f[2],
            backing_file_size=f[3],
            cluster_bits=f[4],
            size=f[5],
            crypt_method=f[6],
            l1_size=f[7],
            l1_table_offset=f[8],
            refcount_table_offset=f[9],
            refcount_table_clusters=f[10],
            nb_snapshots=f[11],
            snapshots_offset=f[12],
            incompatible_features=f[13] if v3 else 0,
            compatible_features=f[14] if v3 else 0,
            autoclear_features=f[15] if v3 else 0,
            refcount_order=f[16] if v3 else REFCOUNT_ORDER,
            header_length=f[17] if v3 else V2_LENGTH,
            compression_type=f[18] if v3 and f[17] > 104 else 0,
        )

    def validate(self) -> None:
        """Checks for headers we write; the input decoder (issue 3) adds the hostile-input checks."""
        if self.version not in (2, 3):
            raise ValueError(f"qcow2 version {self.version} is not 2 or 3")
        if not 9 <= self.cluster_bits <= 21:
            raise ValueError(f"cluster_bits {self.cluster_bits} outside 9..21")
        cs = 1 << self.cluster_bits
        for name in ("l1_table_offset", "refcount_table_offset"):
            if getattr(self, name) % cs:
                raise ValueError(f"{name} is not cluster aligned")
        if self.version == 3 and self.header_length % 8:
            raise ValueError("header_length is not a multiple of 8")
