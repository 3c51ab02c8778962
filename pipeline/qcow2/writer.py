"""The one-pass qcow2 layout: data first, metadata last, header at the very end.

    [header cluster][data clusters in arrival order, each L2 table once its range is complete]
    [the last L2 table][refcount blocks][refcount table][L1 table]

Every data cluster is written once, where the stream is; its host offset is the running length. All
refcounts are 1 and the file has no holes, so the refcount structures follow from the final length
(a small fixed point: the refcount blocks must count themselves). The header, at offset 0, is the
one thing the sink writes out of order.

With compression, compressed clusters are packed back to back at byte granularity (a cluster's data
may straddle two host clusters, as qemu allows); plain clusters and L2 tables start on a cluster
boundary after zero padding. A host cluster's refcount is then the number of compressed clusters that
touch it, so those are counted as they are placed: 2 bytes per output cluster.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from itertools import repeat

from pipeline.errors import UsageError
from pipeline.qcow2.header import (
    INCOMPAT_COMPRESSION,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFCOUNT_ORDER,
    V2_LENGTH,
    V3_LENGTH,
    Qcow2Header,
)

MAX_REFCOUNT = (1 << (1 << REFCOUNT_ORDER)) - 1
_HOST_LITTLE_ENDIAN = sys.byteorder == "little"  # qcow2 tables are big-endian: swap before writing
COMPRESSION_TYPES = {"none": 0, "zlib": 0, "zstd": 1}

MAX_L1_BYTES = 32 * 1024 * 1024  # qemu refuses larger L1 tables (QCOW_MAX_L1_SIZE)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def l1_entries(virtual_size: int, cluster_size: int) -> int:
    return _ceil_div(virtual_size, cluster_size * (cluster_size // 8))


def check_geometry(virtual_size: int, cluster_size: int) -> None:
    if l1_entries(virtual_size, cluster_size) * 8 > MAX_L1_BYTES:
        raise UsageError(
            f"a {virtual_size}-byte disk needs an L1 table over qemu's 32 MiB limit at cluster size "
            f"{cluster_size}; use a larger --cluster-size"
        )


@dataclass(slots=True)
class Tail:
    """What finish() returns: metadata bytes to append, the header for offset 0, the totals."""

    metadata: list[bytes | memoryview]
    header: bytes
    virtual_size: int
    output_size: int


class Qcow2Writer:
    """Assigns host offsets to data clusters as they stream by and builds the metadata.

    Callers feed data runs in ascending guest order and append, in order, the buffers this class
    returns; nothing here does I/O. Memory: one L2 table plus 8 bytes per L2 table written.
    """

    def __init__(self, cluster_size: int, compat: str = "1.1", compress: str = "none") -> None:
        self.cs = cluster_size
        self.bits = cluster_size.bit_length() - 1
        self.version = 3 if compat == "1.1" else 2
        self.l2_entries = cluster_size // 8
        self.host_end = cluster_size  # the header cluster, written last
        self.l1: dict[int, int] = {}  # l1 index -> host offset of its L2 table
        self._l2_index = -1
        self._l2 = array("Q")
        self._l2_used = False
        self.next_guest = 0  # guest offset the next run must start at or after
        self.data_clusters = 0
        self.compressed_clusters = 0
        self.compression_type = COMPRESSION_TYPES[compress]
        if self.compression_type and self.version < 3:
            raise UsageError("zstd compressed clusters need qcow2 v3 (--compat 1.1)")
        # Compressed descriptor: host offset in the low `csize_shift` bits, extra sectors above.
        self.csize_shift = 62 - (self.bits - 8)
        # Refcount per host cluster, kept only when compressed clusters may share host clusters;
        # len(self.rc) == host clusters touched so far (ceil(host_end / cs)).
        self.rc: array[int] | None = array("H", [1]) if compress != "none" else None
        self._zeros = bytes(cluster_size)
        hdr = V3_LENGTH if self.version == 3 else V2_LENGTH
        assert hdr + 8 <= cluster_size

    def _align(self, out: list[bytes | memoryview]) -> None:
        """Pad to a cluster boundary (after packed compressed data)."""
        pad = -self.host_end % self.cs
        if pad:
            out.append(memoryview(self._zeros)[:pad])
            self.host_end += pad

    def _switch_table(self, index: int, out: list[bytes | memoryview]) -> None:
        if self._l2_index >= 0 and self._l2_used:
            self._align(out)
            out.append(self._flush_table())
        self._l2_index = index
        self._l2 = array("Q", bytes(self.cs))
        self._l2_used = False

    def _flush_table(self) -> bytes:
        table = self._l2
        if _HOST_LITTLE_ENDIAN:
            table.byteswap()  # qcow2 is big-endian
        self.l1[self._l2_index] = self.host_end
        self.host_end += self.cs
        if self.rc is not None:
            self.rc.append(1)
        self._l2_used = False
        return table.tobytes()

    def _check_order(self, guest_offset: int) -> None:
        if guest_offset % self.cs:
            raise ValueError("data runs must start on a cluster boundary")
        if guest_offset < self.next_guest:
            raise ValueError("data runs must arrive in ascending guest order")

    def add_data(self, guest_offset: int, data: memoryview, out: list[bytes | memoryview]) -> None:
        """Place `data` (starting on a cluster boundary) and append what the stream gets, in order.

        `out` receives slices of `data`, with any L2 table that completes on the way in between and
        zero padding after a ragged last cluster; the caller writes them in that order.
        """
        cs = self.cs
        self._check_order(guest_offset)
        length = len(data)
        g = guest_offset // cs
        k = _ceil_div(length, cs)
        pos = 0
        if self.rc is not None:
            self._align(out)
        while k:
            t, i = divmod(g, self.l2_entries)
            if t != self._l2_index:
                self._switch_table(t, out)
            m = min(k, self.l2_entries - i)
            h = self.host_end | OFLAG_COPIED
            self._l2[i : i + m] = array("Q", range(h, h + m * cs, cs))
            self._l2_used = True
            self.host_end += m * cs
            if self.rc is not None:
                self.rc.extend(repeat(1, m))
            nbytes = min(length - pos, m * cs)
            out.append(data[pos : pos + nbytes])
            if nbytes < m * cs:
                out.append(bytes(m * cs - nbytes))
            pos += nbytes
            g += m
            k -= m
        self.data_clusters += _ceil_div(length, cs)
        self.next_guest = guest_offset + _ceil_div(length, cs) * cs

    def add_compressed(self, guest_offset: int, payload: bytes, out: list[bytes | memoryview]) -> None:
        """Place one cluster's compressed form right after the previous bytes, wherever that is."""
        cs, rc = self.cs, self.rc
        assert rc is not None, "the writer was made without compression"
        self._check_order(guest_offset)
        if not 0 < len(payload) < cs:
            raise ValueError("a compressed cluster must be smaller than a cluster")
        t, i = divmod(guest_offset // cs, self.l2_entries)
        if t != self._l2_index:
            self._switch_table(t, out)
        start = self.host_end
        if start % cs and rc[start // cs] >= MAX_REFCOUNT:
            # 16-bit refcounts: thousands of tiny compressed clusters may not share one host cluster.
            self._align(out)
            start = self.host_end
        end = start + len(payload)
        extra_sectors = ((end - 1) >> 9) - (start >> 9)
        self._l2[i] = OFLAG_COMPRESSED | (extra_sectors << self.csize_shift) | start
        self._l2_used = True
        first, last = start // cs, (end - 1) // cs
        if first < len(rc):
            rc[first] += 1
            first += 1
        rc.extend(repeat(1, last + 1 - first))
        out.append(payload)
        self.host_end = end
        self.data_clusters += 1
        self.compressed_clusters += 1
        self.next_guest = guest_offset + cs

    def skip_to(self, guest_offset: int) -> None:
        """Zero runs allocate nothing; they only move the ordering watermark."""
        self.next_guest = max(self.next_guest, guest_offset)

    def finish(self, virtual_size: int) -> Tail:
        cs = self.cs
        # qemu counts whole 512-byte sectors: a ragged size is rounded up, the pad reads as zeros.
        vsize = _ceil_div(virtual_size, 512) * 512
        check_geometry(vsize, cs)
        metadata: list[bytes | memoryview] = []
        if self.rc is not None:
            self._align(metadata)
        if self._l2_used:
            metadata.append(self._flush_table())
        n_l1 = l1_entries(vsize, cs)
        l1_clusters = _ceil_div(n_l1 * 8, cs)
        per_block = cs * 8 // (1 << REFCOUNT_ORDER)
        used = self.host_end // cs
        blocks = table = 0
        while True:  # fixed point: refcount blocks and table count themselves
            total = used + blocks + table + l1_clusters
            nb = _ceil_div(total, per_block)
            nt = _ceil_div(nb * 8, cs)
            if (nb, nt) == (blocks, table):
                break
            blocks, table = nb, nt
        total = used + blocks + table + l1_clusters
        blocks_at = self.host_end
        table_at = blocks_at + blocks * cs
        l1_at = table_at + table * cs
        if self.rc is None:
            one = b"\x00\x01"
            for b in range(blocks):
                count = min(per_block, total - b * per_block)
                metadata.append(one * count + bytes(cs - 2 * count))
        else:
            assert len(self.rc) == used
            counts = self.rc + array("H", repeat(1, total - used))
            counts.extend(repeat(0, blocks * per_block - total))
            if _HOST_LITTLE_ENDIAN:
                counts.byteswap()
            raw = counts.tobytes()
            metadata.extend(raw[b * cs : (b + 1) * cs] for b in range(blocks))
        rt = array("Q", (blocks_at + b * cs for b in range(blocks)))
        rt.extend([0] * (table * cs // 8 - blocks))
        l1 = array("Q", [0] * (l1_clusters * cs // 8))
        for idx, off in self.l1.items():
            l1[idx] = off | OFLAG_COPIED
        if _HOST_LITTLE_ENDIAN:
            rt.byteswap()
            l1.byteswap()
        metadata.append(rt.tobytes())
        if l1_clusters:
            metadata.append(l1.tobytes())
        self.host_end = total * cs
        header = Qcow2Header(
            version=self.version,
            cluster_bits=self.bits,
            size=vsize,
            l1_size=n_l1,
            l1_table_offset=l1_at if l1_clusters else 0,
            refcount_table_offset=table_at,
            refcount_table_clusters=table,
            header_length=V3_LENGTH if self.version == 3 else V2_LENGTH,
            incompatible_features=INCOMPAT_COMPRESSION if self.compression_type else 0,
            compression_type=self.compression_type,
        )
        header.validate()
        return Tail(metadata, header.to_bytes(), vsize, self.host_end)
