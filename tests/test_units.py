"""Unit tests of the pieces whose rules are easy to get subtly wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
from pathlib import Path

import pytest

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import SourceError, UsageError
from pipeline.messages import Extent
from pipeline.qcow2.header import Qcow2Header
from pipeline.runner import output_bound
from pipeline.settings import GiB, MiB, Settings, TiB, from_env, parse_size
from pipeline.sinks.s3 import part_size_for, part_size_policy
from pipeline.sources.file import FileSource
from pipeline.stages import ZeroSkipper


def test_parse_size() -> None:
    assert parse_size("64K", "x") == 65536
    assert parse_size("8MiB", "x") == 8 * MiB
    assert parse_size("2m", "x") == 2 * MiB
    assert parse_size("4096", "x") == 4096
    with pytest.raises(UsageError, match="K/M/G/T suffix"):
        parse_size("lots", "x")


def test_settings_env_and_validation() -> None:
    s = from_env({"IMGPIPE_CHUNK_SIZE": "8M", "IMGPIPE_READ_CONCURRENCY": "3"})
    assert s.chunk_size == 8 * MiB
    assert s.read_concurrency == 3
    with pytest.raises(UsageError, match="multiple of the cluster size"):
        from_env({"IMGPIPE_CHUNK_SIZE": "3000K"})
    with pytest.raises(UsageError, match="IMGPIPE_BUFFERS"):
        from_env({"IMGPIPE_BUFFERS": "2"})
    with pytest.raises(UsageError, match="whole number"):
        from_env({"IMGPIPE_RETRIES": "many"})
    budget = Settings().memory_budget()
    assert budget["total"] == sum(v for k, v in budget.items() if k != "total")
    assert budget["total"] < 160 * MiB


@pytest.mark.parametrize("size", [0, 1, 16 * GiB, TiB, 16 * TiB])
def test_known_size_fits_in_10000_parts(size: int) -> None:
    bound = output_bound(size, Settings())
    part, grows = part_size_policy(8 * MiB, bound)
    assert not grows
    assert part >= 5 * MiB
    # part 1 and the rest all of `part` bytes: 10,000 of them hold the largest possible output.
    assert part * 10_000 >= bound
    if size <= 16 * GiB:
        assert part == 8 * MiB  # small and large test images use the same memory


def test_unknown_size_grows_to_one_tib_within_10000_parts() -> None:
    base, grows = part_size_policy(8 * MiB, None)
    assert grows
    sizes = [part_size_for(n, base, grows) for n in range(1, 10_001)]
    assert sum(sizes) >= TiB
    assert max(sizes) <= 128 * MiB
    assert sizes == sorted(sizes)


def test_output_bound_covers_a_fully_allocated_disk() -> None:
    s = Settings()
    size = 3 * GiB + 12345
    clusters = -(-size // s.cluster_size)
    assert output_bound(size, s) >= (clusters + 1) * s.cluster_size


def test_header_round_trip() -> None:
    h = Qcow2Header(
        version=3,
        cluster_bits=16,
        size=10 * GiB,
        l1_size=20,
        l1_table_offset=65536 * 9,
        refcount_table_offset=65536 * 7,
        refcount_table_clusters=1,
    )
    raw = h.to_bytes()
    assert raw[:4] == b"QFI\xfb"
    assert Qcow2Header.from_bytes(raw) == h
    h.validate()
    with pytest.raises(ValueError, match="cluster aligned"):
        dataclasses.replace(h, l1_table_offset=100).validate()
    v2 = dataclasses.replace(h, version=2, header_length=72)
    assert len(v2.to_bytes()) == 72 + 8  # v2 header, then the extension end marker


def _runs(data: bytes, cs: int) -> list[tuple[int, int, bool]]:
    chunk = Chunk(None, bytearray(data), len(data))
    out: list[Extent] = []
    ZeroSkipper(cs).split(Extent(0, len(data), chunk, 0), out)
    return [(e.offset, e.length, e.chunk is None) for e in out]


def test_zero_skipper_runs() -> None:
    cs = 4096
    data = bytearray(256 * 1024)
    data[5000] = 1  # cluster 1
    data[200 * 1024 + 7] = 1  # cluster 50
    runs = _runs(bytes(data), cs)
    assert runs == [
        (0, 4096, True),
        (4096, 4096, False),
        (8192, 50 * 4096 - 8192, True),
        (50 * 4096, 4096, False),
        (51 * 4096, 256 * 1024 - 51 * 4096, True),
    ]
    # Runs tile the extent exactly, whatever the pattern.
    rnd = bytearray(os.urandom(64 * 1024 + 300))
    rnd[:20000] = bytes(20000)
    r = _runs(bytes(rnd), 512)
    assert sum(n for _, n, _ in r) == len(rnd)
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(r))


def test_zero_skipper_ragged_tail() -> None:
    assert _runs(bytes(4096 + 100), 4096) == [(0, 4196, True)]
    assert _runs(bytes(4096) + b"\x01" + bytes(99), 4096) == [(0, 4096, True), (4096, 100, False)]


async def test_closable_queue_ends_iteration() -> None:
    q: ClosableQueue[int] = ClosableQueue(2)

    async def produce() -> None:
        for i in range(5):
            await q.put(i)
        await q.close()

    task = asyncio.create_task(produce())
    got = [i async for i in q]
    await task
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        await q.put(9)


async def test_buffer_pool_bounds_and_reuses() -> None:
    pool = BufferPool(2, 1024)
    a, b = await pool.chunk(), await pool.chunk()
    waiter = asyncio.create_task(pool.chunk())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # the pool is the memory bound: a third buffer waits
    a.release()
    c = await asyncio.wait_for(waiter, 1)
    assert c.buf is a.buf
    a.release()  # a second release is harmless
    b.release()
    c.release()


async def test_buffer_pool_hands_out_the_buffer_released_last() -> None:
    pool = BufferPool(3, 1024)
    a, b = await pool.chunk(), await pool.chunk()
    a_buf, b_buf = a.buf, b.buf
    a.release()
    b.release()
    c = await pool.chunk()
    assert c.buf is b_buf  # still warm in the CPU cache
    d = await pool.chunk()
    assert d.buf is a_buf


async def test_file_source_refuses_a_file_that_shrinks_while_read(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.raw"
    path.write_bytes(os.urandom(MiB))
    settings = Settings(chunk_size=64 * 1024, buffers=6, read_concurrency=1).validate()
    source = FileSource(str(path), settings)
    await source.open()
    pool = BufferPool(settings.buffers, settings.chunk_size)
    q: ClosableQueue[Chunk] = ClosableQueue(1)
    producer = asyncio.create_task(source.produce(pool, q, lambda n: None))
    first = await q.get()
    assert first is not None
    first.release()
    os.truncate(path, 200 * 1024)

    async def drain() -> None:
        while (chunk := await q.get()) is not None:
            chunk.release()
        await producer

    consumer = asyncio.create_task(drain())
    with pytest.raises(SourceError, match="changed while read"):
        await producer
    consumer.cancel()
    await source.close()


def test_output_bound_covers_incompressible_clusters_with_compression_padding() -> None:
    s = Settings(compress="zlib").validate()
    size = 3 * GiB + 12345
    clusters = -(-size // s.cluster_size)
    l2_tables = -(-clusters // (s.cluster_size // 8))
    assert output_bound(size, s) >= (clusters + 2 * l2_tables + 1) * s.cluster_size


def test_sniffing_holds_little() -> None:
    from pipeline.formats.probes import HEAD_BYTES, TAIL_BYTES

    # Every probe's declared regions together: what the sniffer copies while the stream passes.
    assert HEAD_BYTES + TAIL_BYTES < 512 * 1024


async def _stream_reader(data: bytes, window: int, chunk: int = 4096) -> object:
    from pipeline.formats.readers import StreamReader

    q: ClosableQueue[Chunk] = ClosableQueue(len(data) // chunk + 2)
    for off in range(0, len(data), chunk):
        piece = data[off : off + chunk]
        await q.put(Chunk(None, bytearray(piece), len(piece)))
    await q.close()
    return StreamReader(q, len(data), window)


async def test_stream_reader_keeps_a_bounded_window_of_skipped_bytes() -> None:
    from pipeline.errors import CorruptImage, UnsupportedImage
    from pipeline.formats.readers import StreamReader

    data = os.urandom(256 * 1024)
    r = await _stream_reader(data, window=64 * 1024)
    assert isinstance(r, StreamReader)
    assert await r.read(100, 10) == data[100:110]
    # Skipping forward keeps the last `window` bytes of the gap: reading back into them works ...
    assert await r.read(200_000, 16) == data[200_000:200_016]
    assert await r.read(150_000, 1000) == data[150_000:151_000]

    # ... reading them back a second time would map them twice: refused.
    async def read_back_again_and_again() -> None:
        for _ in range(1000):  # 1 MB from a window that never held more than ~200 KB
            await r.read(140_000, 1000)

    with pytest.raises(CorruptImage, match="amplification"):
        await read_back_again_and_again()
    # Bytes before the window were let go: the refusal names the remedies.
    r2 = await _stream_reader(data, window=64 * 1024)
    assert isinstance(r2, StreamReader)
    await r2.read(200_000, 16)
    with pytest.raises(UnsupportedImage, match=r"range-capable source.*IMGPIPE_REORDER_BUFFER"):
        await r2.read(1000, 10)
    # Past the end is a truncated image, not EOF.
    with pytest.raises(CorruptImage, match="truncated"):
        await r2.read(len(data) - 5, 10)
    assert await r2.drain() == len(data)


def test_zero_skipper_whole_extent_check() -> None:
    """An extent empty from end to end is one zero run; the next one, of another length and with one
    byte set in its very last cluster, is still split cluster by cluster."""
    skipper = ZeroSkipper(4096)
    buf = bytearray(b"\xff" * 512 + bytes(512 * 1024))
    out: list[Extent] = []
    assert skipper.split(Extent(0, 256 * 1024, Chunk(None, buf, len(buf)), 512), out) == 256 * 1024
    assert [(e.offset, e.length, e.chunk) for e in out] == [(0, 256 * 1024, None)]
    buf[512 + 384 * 1024 - 1] = 1
    out.clear()
    zeros = skipper.split(Extent(1 << 20, 384 * 1024, Chunk(None, buf, len(buf)), 512), out)
    assert zeros == 380 * 1024
    assert [(e.offset, e.length, e.chunk is None) for e in out] == [
        ((1 << 20), 380 * 1024, True),
        ((1 << 20) + 380 * 1024, 4096, False),
    ]
