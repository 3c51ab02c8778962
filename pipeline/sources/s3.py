"""S3 objects: one HEAD for size and ETag, then concurrent ranged GETs pinned with If-Match."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from yarl import URL

from pipeline.errors import ImgpipeError, SourceError
from pipeline.s3util import S3Context, describe, error_code, parse_s3_url
from pipeline.settings import Settings
from pipeline.sources.base import RangedSource, TransientReadError, check_same_version
from pipeline.sources.rangeio import RangeClient

_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    BotoCoreError,
)


class S3Source(RangedSource):
    def __init__(self, spec: str, settings: Settings, s3: S3Context | None = None) -> None:
        super().__init__(spec, settings)
        self.loc = parse_s3_url(spec)
        self.s3 = s3 or S3Context(settings)
        self._own_ctx = s3 is None
        self.version_id: str | None = None
        # Ranged GETs go out as presigned URLs through the zero-copy client (rangeio); botocore's
        # own get_object is the fallback for answers that client does not frame.
        self._fast: RangeClient | None = None
        self._fast_ok = True

    async def open(self) -> None:
        client = await self.s3.client()
        try:
            head = await client.head_object(Bucket=self.loc.bucket, Key=self.loc.key)
        except (ClientError, BotoCoreError) as exc:
            raise describe(exc, self.spec, SourceError) from None
        self.requests += 1
        self.size = int(head["ContentLength"])
        self.etag = head.get("ETag")
        self.version_id = head.get("VersionId")
        self.ranged = True

    async def _read_into(self, view: memoryview, offset: int) -> int:
        if not self._fast_ok:
            return await super()._read_into(view, offset)
        client = await self.s3.client()
        end = offset + len(view)
        try:
            # Signed per request (local computation), so expiring credentials are always current.
            url = URL(
                await client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.loc.bucket, "Key": self.loc.key}, ExpiresIn=3600
                ),
                encoded=True,
            )
        except (ClientError, BotoCoreError) as exc:
            raise describe(exc, self.spec, SourceError) from None
        if self._fast is None or (self._fast.host, self._fast.port) != (url.host, url.port):
            if self._fast is not None:
                self._fast.close()
            s = self.settings
            # The CA bundle botocore trusts (a store behind a private CA) must be trusted here too.
            cafile = os.environ.get("AWS_CA_BUNDLE") or None
            self._fast = RangeClient(url, s.connect_timeout, s.read_timeout, cafile=cafile)
        headers = {"Range": f"bytes={offset}-{end - 1}", "User-Agent": "imgpipe"}
        if self.etag:
            headers["If-Match"] = self.etag
        answer = await self._fast_get(self._fast, headers, view, url.raw_path_qs)
        if answer is None:
            self._fast_ok = False  # botocore's get_object from now on
            return await super()._read_into(view, offset)
        head, got = answer
        status = head.status
        if status == 412:
            raise self._as_error("PreconditionFailed")
        if status >= 500:
            raise TransientReadError(f"S3 HTTP {status}")
        if status in (403, 404):
            code = "AccessDenied" if status == 403 else "NoSuchKey"
            raise self._as_error(code)
        if status != 206:
            raise SourceError(
                f"{self.spec}: S3 answered a ranged GET with HTTP {status} {head.reason}".rstrip()
            )
        cr = head.get("Content-Range") or ""
        self._check_range_answer(head.get("ETag"), cr, offset, end)
        if got != len(view):
            raise SourceError(f"{self.spec}: asked for bytes {offset}-{end - 1}, got {cr!r}")
        return got

    def _check_range_answer(self, etag: str | None, content_range: str, start: int, end: int) -> None:
        """What every 206 to one of our ranged GETs must carry: the pinned version, that range, that size."""
        check_same_version(self.spec, self.etag, etag)
        if not content_range.startswith(f"bytes {start}-{end - 1}/"):
            raise SourceError(f"{self.spec}: asked for bytes {start}-{end - 1}, got {content_range!r}")
        if content_range.rsplit("/", 1)[-1] != str(self.size):
            raise self._as_error("PreconditionFailed")  # the object was replaced by one of another size

    def _as_error(self, code: str) -> ImgpipeError:
        """The same one-line wording botocore's error for `code` gets (see s3util.describe)."""
        return describe(ClientError({"Error": {"Code": code}}, "GetObject"), self.spec, SourceError)

    async def _range_pieces(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        client = await self.s3.client()
        kwargs: dict[str, Any] = {
            "Bucket": self.loc.bucket,
            "Key": self.loc.key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if self.etag:
            kwargs["IfMatch"] = self.etag
        try:
            resp = await client.get_object(**kwargs)
        except ClientError as exc:
            code, status = error_code(exc)
            if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
                raise TransientReadError(f"S3 {code or status}") from None
            raise describe(exc, self.spec, SourceError) from None
        except _STREAM_ERRORS as exc:
            raise TransientReadError(str(exc) or type(exc).__name__) from None
        self.requests += 1
        body = resp["Body"]
        try:
            self._check_range_answer(resp.get("ETag"), resp.get("ContentRange", ""), start, end)
            while True:
                try:
                    piece = await body.read(1 << 20)
                except _STREAM_ERRORS as exc:
                    raise TransientReadError(str(exc) or type(exc).__name__) from None
                if not piece:
                    break
                yield piece
        except ImgpipeError:
            raise
        finally:
            body.close()

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._own_ctx:
            await self.s3.aclose()
