"""The zero-copy ranged GET client against a scripted HTTP origin on loopback (byte-exact answers)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from yarl import URL

from pipeline.sources.rangeio import RangeClient, RangeIOError, Unframed

BODY = os.urandom(300_000)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[int, int] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("range: bytes="):
            a, b = line.split("=", 1)[1].split("-")
            return int(a), int(b) + 1
    raise AssertionError("no Range header")


def partial_head(a: int, b: int, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b - 1}/{len(BODY)}\r\n"
        f'Content-Length: {b - a}\r\nETag: "v1"\r\n{extra}\r\n'
    ).encode()


@pytest.fixture
async def origin(request: pytest.FixtureRequest) -> AsyncIterator[tuple[URL, list[int]]]:
    """Serves BODY with the handler given by the test's parameter; yields (url, connections seen)."""
    handler: Handler = request.param
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while (rng := await read_request(reader)) is not None:
                await handler(reader, writer, *rng)
                if writer.is_closing():
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield URL(f"http://127.0.0.1:{port}/disk.raw"), connections
    server.close()
    await server.wait_closed()


async def good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, a: int, b: int) -> None:
    # Headers and the first body bytes in one write, the rest dribbled: exercises the early-body path.
    writer.write(partial_head(a, b) + BODY[a : a + 100])
    await writer.drain()
    for p in range(a + 100, b, 7000):
        writer.write(BODY[p : min(p + 7000, b)])
    await writer.drain()


async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, a: int, b: int) -> None:
    body = BODY[a:b]
    writer.write(
        f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b - 1}/{len(BODY)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    await writer.drain()


async def drops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, a: int, b: int) -> None:
    writer.write(partial_head(a, b) + BODY[a : a + 5000])
    await writer.drain()
    writer.close()


async def too_long(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, a: int, b: int) -> None:
    writer.write(partial_head(a, b) + BODY[a:b] + b"garbage after the body")
    await writer.drain()


async def not_partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, a: int, b: int) -> None:
    writer.write(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


def client(url: URL) -> RangeClient:
    return RangeClient(url, connect_timeout=5, read_timeout=5)


@pytest.mark.parametrize("origin", [good], indirect=True)
async def test_bodies_land_in_the_target_and_connections_are_reused(origin: tuple[URL, list[int]]) -> None:
    url, connections = origin
    c = client(url)
    for a in range(0, len(BODY), 64_000):
        target = bytearray(min(64_000, len(BODY) - a))
        head, got = await c.get({"Range": f"bytes={a}-{a + len(target) - 1}"}, memoryview(target))
        assert head.status == 206
        assert head.get("ETag") == '"v1"'
        assert got == len(target)
        assert target == BODY[a : a + len(target)]
    assert len(connections) == 1  # keep-alive: one connection for every range
    c.close()


@pytest.mark.parametrize("origin", [chunked], indirect=True)
async def test_chunked_answers_are_left_to_aiohttp(origin: tuple[URL, list[int]]) -> None:
    url, _ = origin
    c = client(url)
    with pytest.raises(Unframed):
        await c.get({"Range": "bytes=0-999"}, memoryview(bytearray(1000)))
    c.close()


@pytest.mark.parametrize("origin", [drops], indirect=True)
async def test_a_dropped_connection_reports_the_bytes_that_landed(origin: tuple[URL, list[int]]) -> None:
    url, connections = origin
    c = client(url)
    target = bytearray(50_000)
    with pytest.raises(RangeIOError) as info:
        await c.get({"Range": "bytes=1000-50999"}, memoryview(target))
    assert info.value.received == 5000
    assert target[:5000] == BODY[1000:6000]
    # The next request opens a new connection rather than reusing the dead one.
    with pytest.raises(RangeIOError):
        await c.get({"Range": "bytes=0-49999"}, memoryview(target))
    assert len(connections) == 2
    c.close()


@pytest.mark.parametrize("origin", [too_long], indirect=True)
async def test_bytes_beyond_the_body_retire_the_connection(origin: tuple[URL, list[int]]) -> None:
    url, connections = origin
    c = client(url)
    for _ in range(2):
        target = bytearray(1000)
        head, got = await c.get({"Range": "bytes=0-999"}, memoryview(target))
        assert (head.status, got, bytes(target)) == (206, 1000, BODY[:1000])
        await asyncio.sleep(0.05)
    assert len(connections) == 2  # the trailing garbage made the first connection unusable
    c.close()


@pytest.mark.parametrize("origin", [not_partial], indirect=True)
async def test_other_statuses_come_back_without_a_body(origin: tuple[URL, list[int]]) -> None:
    url, _ = origin
    c = client(url)
    target = bytearray(10)
    head, got = await c.get({"Range": "bytes=0-9"}, memoryview(target))
    assert (head.status, got) == (412, 0)
    assert target == bytearray(10)
    c.close()
