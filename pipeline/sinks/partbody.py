"""Part buffers that aiohttp sends without copying them.

A bytearray body costs the event loop three copies of every part before the kernel's own: aiohttp's
BytesPayload slices it to the declared length (a bytearray slice is a copy), its writer joins the
headers to the body (`b"".join` on Python < 3.12.9), and the transport keeps whatever the socket did
not take at once. Profiled on HTTP -> S3 of the 4 GiB benchmark image (1.2 GiB uploaded): 2.1 s of
the loop's CPU, as much as the peer's whole upload.

A `PartBody` is still a bytearray, so botocore validates, measures and signs it as one; aiohttp picks
`PartPayload` for it by exact type, which sends the headers alone and then the body as memoryview
slices small enough for the socket to take them whole.

Where botocore streams the body as aws-chunked with a checksum trailer (its `when_supported` default,
which imgpipe keeps against AWS itself), it wraps the body in an `io.BytesIO` first, a copy of its
own: there this payload is not used, and nothing is worse than with a plain bytearray.
"""

from __future__ import annotations

from typing import Any

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter

# Small enough that a loopback or LAN socket takes most pieces in one send (the rest is copied into
# the transport's buffer), large enough that the per-write Python cost stays small (~5,000 writes/GiB).
PIECE = 256 * 1024


class PartBody(bytearray):
    """One multipart-upload part's buffer (see the module docstring)."""

    __slots__ = ()


class PartPayload(payload.Payload):
    _autoclose = True  # nothing to close

    def __init__(self, value: PartBody, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return bytes(self._value)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        # An empty write sends the buffered headers on their own instead of joined to the first piece.
        await writer.write(b"")
        for start in range(0, len(view), PIECE):
            await writer.write(view[start : start + PIECE])


# Ahead of aiohttp's own: before aiohttp 3.11 the registry went by isinstance in order, and its
# BytesPayload (registered for bytearray) would take a PartBody. Every other body keeps aiohttp's.
payload.PAYLOAD_REGISTRY.register(PartPayload, PartBody, order=payload.Order.try_first)
