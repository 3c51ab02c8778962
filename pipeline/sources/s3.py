"""S3 objects: one HEAD for size and ETag, then concurrent ranged GETs pinned with If-Match."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ImgpipeError, SourceError
from pipeline.s3util import S3Context, describe, error_code, parse_s3_url
from pipeline.settings import Settings
from pipeline.sources.base import RangedSource, TransientReadError, check_same_version

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
            check_same_version(self.spec, self.etag, resp.get("ETag"))
            cr = resp.get("ContentRange", "")
            if not cr.startswith(f"bytes {start}-{end - 1}/"):
                raise SourceError(f"{self.spec}: asked for bytes {start}-{end - 1}, got {cr!r}")
            if cr.rsplit("/", 1)[-1] != str(self.size):
                raise describe(
                    ClientError({"Error": {"Code": "PreconditionFailed"}}, "GetObject"),
                    self.spec,
                    SourceError,
                )
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
        if self._own_ctx:
            await self.s3.aclose()
