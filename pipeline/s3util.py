"""S3 plumbing shared by the S3 source and sink: URL parsing, one client per job, error wording.

Endpoint, region and credentials come from the standard AWS environment and config files, as every
AWS tool does (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION, ...); --endpoint-url overrides.

With a custom endpoint (Ceph RGW, MinIO, any S3-compatible store) two defaults change, each only when
the user has not chosen: path-style addressing, and request checksums "when_required" instead of
botocore's "when_supported". The latter, over HTTPS, streams every upload as aws-chunked with a CRC32
trailer and no Content-Length, which Ceph RGW 16.2 refuses (MissingContentLength; measured). Over
plain HTTP SigV4 signs each body's SHA-256 anyway, and over HTTPS TLS protects it in transit.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ImgpipeError, SourceChanged, UsageError
from pipeline.settings import Settings

if TYPE_CHECKING:
    from botocore.exceptions import ClientError


@dataclass(frozen=True, slots=True)
class S3Url:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_url(spec: str) -> S3Url:
    rest = spec[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise UsageError(f"{spec!r}: an S3 location is s3://BUCKET/KEY, with both parts")
    return S3Url(bucket, key)


class S3Context:
    """One aiobotocore client per job, opened on first use and closed with the job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def client(self) -> Any:
        if self._client is None:
            # Imported here: botocore and aiohttp take a quarter of a second to import, which a
            # file-to-file job should not pay.
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            s = self.settings
            endpoint = (
                s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            )
            s3cfg: dict[str, Any] = {}
            extra: dict[str, Any] = {}
            session = get_session()
            if endpoint:
                # Self-hosted stores (Ceph RGW, MinIO, moto) answer path-style; AWS picks its own default.
                s3cfg["addressing_style"] = os.environ.get("IMGPIPE_S3_ADDRESSING_STYLE", "path")
                if not _user_set(session, "request_checksum_calculation", "AWS_REQUEST_CHECKSUM_CALCULATION"):
                    extra["request_checksum_calculation"] = "when_required"
            config = AioConfig(
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                retries={"mode": "standard", "max_attempts": s.retries + 1},
                max_pool_connections=max(s.read_concurrency, s.upload_concurrency) + 4,
                s3=s3cfg or None,
                **extra,
            )
            self._client = await self._stack.enter_async_context(
                session.create_client("s3", endpoint_url=endpoint, config=config)
            )
        return self._client

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()


def _user_set(session: Any, option: str, env_var: str) -> bool:
    """Whether the user chose `option` (environment variable or AWS config profile): theirs wins."""
    from botocore.exceptions import BotoCoreError

    if os.environ.get(env_var, "").strip():
        return True
    try:
        return option in session.get_scoped_config()
    except BotoCoreError:  # e.g. an unknown AWS_PROFILE: creating the client reports it
        return False


def error_code(exc: ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", "")), int(status or 0)


def describe(exc: BaseException, where: str, kind: type[ImgpipeError]) -> ImgpipeError:
    """A one-line error that says what failed and, where it can, what to change."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        if code in ("PreconditionFailed", "412") or status == 412:
            return SourceChanged(
                f"{where} changed while it was being read (ETag no longer matches); "
                "run the job again to convert one consistent version"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return kind(f"{where}: no such object")
        if code == "NoSuchBucket":
            return kind(f"{where}: no such bucket")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return kind(f"{where}: access denied ({code}); check the credentials and the bucket policy")
        msg = exc.response.get("Error", {}).get("Message", "")
        return kind(f"{where}: S3 error {code or status}: {msg}".rstrip(": "))
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return kind(
            f"{where}: no AWS credentials found; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if isinstance(exc, EndpointConnectionError):
        return kind(
            f"{where}: cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL or --endpoint-url"
        )
    text = " ".join(str(exc).split()) or type(exc).__name__
    return kind(f"{where}: {text}")
