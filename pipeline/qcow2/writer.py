"""The one-pass qcow2 layout: data first, metadata last, header at the very end.

    [header cluster][data clusters in arrival order, each L2 table once its range is complete]
    [the last L2 table][refcount blocks][refcount table][L1 table]

Every data cluster is written once, where the stream is; its host offset is the running length. All
refcounts are 1 and the file has no holes, so the refcount structures follow from the final length
(a small fixed point: the refcount blocks must count themselves). The header, at offset 0, is the
one thing the sink writes out of order.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from pipeline.errors import UsageError
from pipeline.qcow2.header import OFLAG_COPIED, REFCOUNT_ORDER, V2_LENGTH, V3_LENGTH, Qcow2Header

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

    metadata: list[bytes]
    header: bytes
    virtual_size: int
    output_size: int


class Qcow2Writer:
    """Assigns host offsets to data clusters as they stream by and builds the metadata.

    Callers feed data runs in ascending guest order and append, in order, the buffers this class
    returns; nothing here does I/O. Memory: one L2 table plus 8 bytes per L2 table written.
    """

    def __init__(self, cluster_size: int, compat: str = "1.1") -> None:
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
        hdr = V3_LENGTH if self.version == 3 else V2_LENGTH
        assert hdr + 8 <= cluster_size

    def _switch_table(self, index: int, out: list[bytes | memoryview]) -> None:
        if self._l2_index >= 0 and self._l2_used:
            out.append(self._flush_table())
        self._l2_index = index
        self._l2 = array("Q", bytes(self.cs))
        self._l2_used = False

    def _flush_table(self) -> bytes:
        table = self._l2
        if struct.pack("=I", 1) == struct.pack("<I", 1):
            table.byteswap()  # qcow2 is big-endian
        self.l1[self._l2_index] = self.host_end
        self.host_end += self.cs
        self._l2_used = False
        return table.tobytes()

    def add_data(self, guest_offset: int, data: memoryview, out: list[bytes | memoryview]) -> None:
        """Place `data` (starting on a cluster boundary) and append what the stream gets, in order.

        `out` receives slices of `data`, with any L2 table that completes on the way in between and
        zero padding after a ragged last cluster; the caller writes them in that order.
        """
        cs = self.cs
        if guest_offset % cs:
            raise ValueError("data runs must start on a cluster boundary")
        if guest_offset < self.next_guest:
            raise ValueError("data runs must arrive in ascending guest order")
        length = len(data)
        g = guest_offset // cs
        k = _ceil_div(length, cs)
        pos = 0
        while k:
            t, i = divmod(g, self.l2_entries)
            if t != self._l2_index:
                self._switch_table(t, out)
            m = min(k, self.l2_entries - i)
            h = self.host_end | OFLAG_COPIED
            self._l2[i : i + m] = array("Q", range(h, h + m * cs, cs))
            self._l2_used = True
            self.host_end += m * cs
            nbytes = min(length - pos, m * cs)
            out.append(data[pos : pos + nbytes])
            if nbytes < m * cs:
                out.append(bytes(m * cs - nbytes))
            pos += nbytes
            g += m
            k -= m
        self.data_clusters += _ceil_div(length, cs)
        self.next_guest = guest_offset + _ceil_div(length, cs) * cs

    def skip_to(self, guest_offset: int) -> None:
        """Zero runs allocate nothing; they only move the ordering watermark."""
        self.next_guest = max(self.next_guest, guest_offset)

    def finish(self, virtual_size: int) -> Tail:
        cs = self.cs
        # qemu counts whole 512-byte sectors: a ragged size is rounded up, the pad reads as zeros.
        vsize = _ceil_div(virtual_size, 512) * 512
        check_geometry(vsize, cs)
        metadata: list[bytes] = []
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
        one = b"\x00\x01"
        for b in range(blocks):
            count = min(per_block, total - b * per_block)
            metadata.append(one * count + bytes(cs - 2 * count))
        rt = array("Q", (blocks_at + b * cs for b in range(blocks)))
        rt.extend([0] * (table * cs // 8 - blocks))
        l1 = array("Q", [0] * (l1_clusters * cs // 8))
        for idx, off in self.l1.items():
            l1[idx] = off | OFLAG_COPIED
        if struct.pack("=I", 1) == struct.pack("<I", 1):
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
        )
        header.validate()
        return Tail(metadata, header.to_bytes(), vsize, self.host_end)
