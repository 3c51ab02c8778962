"""S3 part buffers go out through aiohttp byte for byte and without being copied on the way."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import payload

from pipeline.sinks.partbody import PartBody, PartPayload

MiB = 1024 * 1024


@pytest.fixture
async def sink_server() -> AsyncIterator[tuple[str, list[tuple[bytes, bytes]]]]:
    """A loopback HTTP server that reads each PUT and answers 200; yields (url, [(head, SHA-256 of body)]).

    The body is read in small pieces and only hashed, so the server holds little memory of its own."""
    seen: list[tuple[bytes, bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                digest = hashlib.sha256()
                while length:
                    piece = await reader.read(min(length, 64 * 1024))
                    if not piece:
                        return
                    digest.update(piece)
                    length -= len(piece)
                seen.append((head, digest.digest()))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/bucket/key", seen
    server.close()
    await server.wait_closed()


def test_aiohttp_picks_the_part_payload_for_part_buffers_only() -> None:
    assert isinstance(payload.PAYLOAD_REGISTRY.get(PartBody(10)), PartPayload)
    assert not isinstance(payload.PAYLOAD_REGISTRY.get(bytearray(10)), PartPayload)
    assert not isinstance(payload.PAYLOAD_REGISTRY.get(b"0123456789"), PartPayload)


async def test_a_part_arrives_byte_for_byte(sink_server: tuple[str, list[tuple[bytes, bytes]]]) -> None:
    url, seen = sink_server
    data = os.urandom(3 * MiB + 12345)  # not a multiple of the write piece
    body = PartBody(data)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # a second request on the same connection: the first ended cleanly
            async with session.put(url, data=body) as resp:
                assert resp.status == 200
    assert len(seen) == 2
    for head, got in seen:
        assert f"content-length: {len(data)}".encode() in head.lower()
        assert got == hashlib.sha256(data).digest()


async def test_sending_a_part_does_not_copy_it(sink_server: tuple[str, list[tuple[bytes, bytes]]]) -> None:
    """A bytearray body of 8 MiB costs aiohttp a slice and a join (16 MiB of copies); a part costs at
    most the piece the socket did not take at once."""
    url, seen = sink_server
    size = 8 * MiB
    body = PartBody(os.urandom(size))
    async with aiohttp.ClientSession() as session:
        async with session.put(url, data=bytearray(8)) as resp:  # connection and imports warmed up
            assert resp.status == 200
        tracemalloc.start()
        try:
            async with session.put(url, data=body) as resp:
                assert resp.status == 200
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert seen[-1][1] == hashlib.sha256(body).digest()
    assert peak < 2 * MiB, f"peak {peak / MiB:.1f} MiB traced while sending an 8 MiB part"
