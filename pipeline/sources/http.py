"""HTTP(S) sources: ranged reads pinned to the first response's ETag, sequential when ranges are absent."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Callable
from email.utils import parsedate_to_datetime

import aiohttp
from yarl import URL

from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import SourceChanged, SourceError
from pipeline.settings import Settings
from pipeline.sources.base import ChunkFiller, OnBytes, RangedSource, TransientReadError, check_same_version
from pipeline.sources.rangeio import RangeClient

HeaderGet = Callable[[str], str | None]
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_NETWORK_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError)


class HttpSource(RangedSource):
    def __init__(self, spec: str, settings: Settings) -> None:
        super().__init__(spec, settings)
        self.url = URL(spec, encoded=True)
        self.last_modified: str | None = None
        self.redirected = False
        self._session: aiohttp.ClientSession | None = None
        self._first: aiohttp.ClientResponse | None = None
        self._fast: RangeClient | None = None  # ranged bodies straight into chunks (see rangeio)

    def _headers(self, start: int | None, end: int | None) -> dict[str, str]:
        # identity: we want the stored bytes, not a transfer-compressed rendition of them.
        h = {"Accept-Encoding": "identity", "User-Agent": "imgpipe"}
        if start is not None and end is not None:
            h["Range"] = f"bytes={start}-{end - 1}"
        if self.etag and not self.etag.startswith("W/"):
            h["If-Match"] = self.etag
        elif self.last_modified:
            h["If-Unmodified-Since"] = self.last_modified
        return h

    async def open(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout
            ),
            connector=aiohttp.TCPConnector(limit=s.read_concurrency + 2),
            auto_decompress=False,
        )
        failures = 0
        while True:
            try:
                resp = await self._session.get(
                    self.url, headers=self._headers(0, s.chunk_size), allow_redirects=True, max_redirects=10
                )
            except aiohttp.TooManyRedirects:
                raise SourceError(f"{self.spec}: too many redirects") from None
            except (aiohttp.InvalidURL, ValueError) as exc:
                raise SourceError(f"{self.spec}: not a usable URL ({exc})") from None
            except _NETWORK_ERRORS as exc:
                failures += 1
                if failures > s.retries:
                    raise SourceError(f"{self.spec}: cannot connect: {_describe(exc)}") from None
                await asyncio.sleep(s.retry_backoff * 2 ** (failures - 1))
                continue
            self.requests += 1
            if resp.status in _RETRY_STATUS and failures < s.retries:
                resp.release()
                failures += 1
                await asyncio.sleep(s.retry_backoff * 2 ** (failures - 1))
                continue
            break
        # Redirects are resolved once: every later range goes straight to where this one landed.
        self.redirected = resp.url != self.url
        self.url = resp.url
        if resp.status == 416:
            total = _parse_total(resp.headers.get("Content-Range"))
            resp.release()
            if total == 0:
                self.size, self.ranged = 0, True
                return
            raise SourceError(f"{self.spec}: server refused the first range (HTTP 416)")
        if resp.status not in (200, 206):
            resp.release()
            raise SourceError(f"{self.spec}: HTTP {resp.status} {resp.reason or ''}".strip())
        self.etag = resp.headers.get("ETag")
        self.last_modified = resp.headers.get("Last-Modified")
        if self.last_modified:
            try:
                parsedate_to_datetime(self.last_modified)
            except (TypeError, ValueError):
                self.last_modified = None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or m.group(1) != "0" or m.group(3) == "*":
                resp.release()
                raise SourceError(
                    f"{self.spec}: unusable Content-Range {resp.headers.get('Content-Range')!r}"
                )
            self.size, self.ranged = int(m.group(3)), True
        else:
            self.size = resp.content_length  # None when the server does not say
            self.ranged = False
        self._first = resp
        if self.ranged and self.size:
            self._fast = RangeClient(self.url, s.connect_timeout, s.read_timeout)

    async def _first_chunk(self, pool: BufferPool) -> Chunk | None:
        resp, self._first = self._first, None
        if resp is None:
            return None
        length = min(pool.size, self.size or 0)
        if length == 0:
            resp.release()
            return None
        chunk = await pool.chunk()
        got = 0
        try:
            async for piece in resp.content.iter_any():
                n = len(piece)
                if got + n > length:
                    raise SourceError(f"{self.spec}: server sent more than the first range it announced")
                chunk.space(got, got + n)[:] = piece
                got += n
        except _NETWORK_ERRORS:
            pass  # resumed below from the last byte received
        finally:
            resp.release()
        self.bytes_fetched += got
        chunk.length = got
        if got < length:
            # Finish the first range with the same resuming logic as every other range.
            rest = await self.read_range(got, length - got)
            chunk.space(got, length)[:] = rest
            chunk.length = length
        return chunk

    async def _read_into(self, view: memoryview, offset: int) -> int:
        if self._fast is None:
            return await super()._read_into(view, offset)
        end = offset + len(view)
        answer = await self._fast_get(self._fast, self._headers(offset, end), view)
        if answer is None:
            self._fast = None  # this server's answers need aiohttp's framing: use it from now on
            return await super()._read_into(view, offset)
        head, got = answer
        self._check_range_answer(head.status, head.get, offset, end)
        if got != len(view):
            raise SourceError(
                f"{self.spec}: asked for {len(view)} bytes at {offset}, "
                f"the answer announced {head.get('content-length')}"
            )
        return got

    def _check_range_answer(self, status: int, header: HeaderGet, start: int, end: int) -> None:
        """What every answer to one of our ranged GETs must be: 206, same version, that range."""
        if status == 412:
            raise SourceChanged(
                f"{self.spec} changed while it was being read (precondition on "
                f"{'ETag ' + self.etag if self.etag else 'Last-Modified'} failed); "
                "run the job again to convert one consistent version"
            )
        if status in _RETRY_STATUS:
            raise TransientReadError(f"HTTP {status}")
        if status != 206:
            raise SourceError(
                f"{self.spec}: expected a partial response to a range request, got HTTP {status}"
            )
        check_same_version(self.spec, self.etag, header("ETag"))
        m = _CONTENT_RANGE.match(header("Content-Range") or "")
        if not m or (int(m.group(1)), int(m.group(2)) + 1) != (start, end):
            raise SourceError(
                f"{self.spec}: asked for bytes {start}-{end - 1}, server answered {header('Content-Range')!r}"
            )
        if m.group(3) != str(self.size):
            raise SourceChanged(
                f"{self.spec} changed size while it was being read ({self.size} -> {m.group(3)}); "
                "run the job again"
            )

    async def _range_pieces(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        assert self._session is not None
        try:
            resp = await self._session.get(self.url, headers=self._headers(start, end), allow_redirects=False)
        except _NETWORK_ERRORS as exc:
            raise TransientReadError(_describe(exc)) from None
        self.requests += 1
        try:
            self._check_range_answer(resp.status, resp.headers.get, start, end)
            try:
                async for piece in resp.content.iter_any():
                    yield piece
            except _NETWORK_ERRORS as exc:
                raise TransientReadError(_describe(exc)) from None
        finally:
            resp.release()

    async def produce(self, pool: BufferPool, out: ClosableQueue[Chunk], on_bytes: OnBytes) -> None:
        if self.ranged:
            await super().produce(pool, out, on_bytes)
            return
        resp, self._first = self._first, None
        assert resp is not None
        filler = ChunkFiller(pool, out, on_bytes)
        try:
            async for piece in resp.content.iter_any():
                self.bytes_fetched += len(piece)
                await filler.feed(piece)
        except _NETWORK_ERRORS as exc:
            raise SourceError(
                f"{self.spec}: connection lost after {filler.total} bytes ({_describe(exc)}) and the server "
                "does not accept Range requests, so the read cannot resume; retry, or serve the image "
                "from a server with range support"
            ) from None
        finally:
            resp.release()
        if self.size is not None and filler.total != self.size:
            raise SourceError(f"{self.spec}: body ended after {filler.total} of {self.size} bytes")
        await filler.finish()

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._first is not None:
            self._first.release()
            self._first = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def _parse_total(content_range: str | None) -> int | None:
    if content_range and content_range.startswith("bytes */"):
        try:
            return int(content_range[8:])
        except ValueError:
            return None
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
