"""Self-tests for the loopback servers in tests/servers.py (fast: the whole file takes a few seconds)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import MotoServer, RangeHTTPServer, S3FaultProxy, S3Store

SIZE = 1_000_003  # odd on purpose: several 256 KiB chunks and an odd half
DATA = hashlib.sha256(b"imgpipe").digest() * (SIZE // 32) + b"\x01\x02\x03"
assert len(DATA) == SIZE
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Path:
    (tmp_path / "disk.img").write_bytes(DATA)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "small.bin").write_bytes(b"0123456789")
    return tmp_path


@pytest.fixture
def http_server(http_root: Path) -> Iterator[RangeHTTPServer]:
    with RangeHTTPServer(http_root) as server:
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def proxy(store: S3Store) -> Iterator[S3FaultProxy]:
    """The fault proxy in front of each store of the session (moto, Ceph RGW)."""
    with S3FaultProxy(store) as p:
        yield p


@pytest.fixture
def new_bucket(store: S3Store) -> Iterator[Callable[[Any], str]]:
    """Create a bucket through a given client (so the proxy logs it); all are removed afterwards."""
    made: list[str] = []

    def make(client: Any) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        made.append(name)
        return name

    yield make
    for name in made:
        store.remove_bucket(name)


def request(
    server: RangeHTTPServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


async def read_into(session: aiohttp.ClientSession, url: str, sink: bytearray) -> None:
    """GET url, appending body bytes to sink as they arrive (so a test sees what came before an error)."""
    async with session.get(url) as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(65536):
            sink += chunk


# --------------------------------------------------------------------------------------------------------
# RangeHTTPServer
# --------------------------------------------------------------------------------------------------------


def test_plain_get_and_head(http_server: RangeHTTPServer) -> None:
    status, headers, body = request(http_server, "/disk.img")
    assert status == 200
    assert body == DATA
    assert headers["Content-Length"] == str(SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    etag = headers["ETag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert headers["Last-Modified"].endswith("GMT")

    status, hheaders, body = request(http_server, "/disk.img", "HEAD")
    assert (status, body) == (200, b"")
    assert hheaders["Content-Length"] == str(SIZE)
    assert hheaders["ETag"] == etag

    assert request(http_server, "/sub/small.bin")[2] == b"0123456789"
    assert request(http_server, "/nope.img")[0] == 404
    assert request(http_server, "/../etc/passwd")[0] == 404
    assert http_server.bytes_sent("/disk.img") == SIZE
    assert http_server.request_count("/disk.img") == 2


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "expected"),
    [
        ("bytes=0-9", 206, "bytes 0-9/1000003", DATA[0:10]),
        ("bytes=999990-", 206, "bytes 999990-1000002/1000003", DATA[999990:]),
        ("bytes=-5", 206, "bytes 999998-1000002/1000003", DATA[-5:]),
        ("bytes=1000000-2000000", 206, "bytes 1000000-1000002/1000003", DATA[1000000:]),
        ("bytes=262100-524400", 206, "bytes 262100-524400/1000003", DATA[262100:524401]),
        ("bytes=1000003-", 416, "bytes */1000003", b""),
        ("bytes=-0", 416, "bytes */1000003", b""),
        ("bytes=0-1,5-6", 200, None, DATA),  # multi-range: ignored
        ("bytes=9-2", 200, None, DATA),  # invalid: ignored
    ],
)
def test_ranges(
    http_server: RangeHTTPServer, range_header: str, status: int, content_range: str | None, expected: bytes
) -> None:
    got_status, headers, body = request(http_server, "/disk.img", headers={"Range": range_header})
    assert got_status == status
    assert headers.get("Content-Range") == content_range
    assert body == expected
    assert headers["Content-Length"] == str(len(expected))


def test_if_match_and_etag_changes_on_replace(http_server: RangeHTTPServer, http_root: Path) -> None:
    etag = request(http_server, "/disk.img", "HEAD")[1]["ETag"]
    status, _, body = request(http_server, "/disk.img", headers={"If-Match": etag, "Range": "bytes=5-9"})
    assert (status, body) == (206, DATA[5:10])
    assert request(http_server, "/disk.img", headers={"If-Match": "*"})[0] == 200
    assert request(http_server, "/disk.img", headers={"If-Match": f"W/{etag}"})[0] == 412

    tmp = http_root / "disk.img.new"
    tmp.write_bytes(DATA[::-1])
    os.replace(tmp, http_root / "disk.img")
    new_etag = request(http_server, "/disk.img", "HEAD")[1]["ETag"]
    assert new_etag != etag
    status, _, body = request(http_server, "/disk.img", headers={"If-Match": etag, "Range": "bytes=0-9"})
    assert (status, body) == (412, b"")
    # If-Range with a stale validator: the Range is ignored and the whole (new) file comes back.
    status, _, body = request(http_server, "/disk.img", headers={"If-Range": etag, "Range": "bytes=0-9"})
    assert (status, body) == (200, DATA[::-1])
    assert [r.status for r in http_server.log][-2:] == [412, 200]
    assert http_server.log[-2].if_match == etag
    assert http_server.log[-2].range == "bytes=0-9"


def test_norange(http_server: RangeHTTPServer) -> None:
    status, headers, body = request(
        http_server, "/norange/disk.img", headers={"Range": "bytes=0-9", "If-Match": '"bogus"'}
    )
    assert (status, body) == (200, DATA)
    assert "Accept-Ranges" not in headers
    assert "ETag" not in headers
    assert "Content-Range" not in headers


def test_redirect(http_server: RangeHTTPServer) -> None:
    status, headers, _ = request(http_server, "/redirect/disk.img")
    assert status == 302
    assert headers["Location"] == http_server.url("/disk.img")
    assert http_server.redirects_served == 1

    async def follow() -> tuple[int, bytes, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(http_server.url("/redirect/disk.img")) as r,
        ):
            return r.status, await r.read(), str(r.url)

    status, body, final = asyncio.run(follow())
    assert (status, body, final) == (200, DATA, http_server.url("/disk.img"))
    assert http_server.redirects_served == 2


@pytest.mark.asyncio
async def test_drop_truncates_then_recovers(http_server: RangeHTTPServer) -> None:
    path = "/drop/300000/disk.img"
    http_server.set_drops(path, 2)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            received = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_into(session, http_server.url(path), received)
            assert bytes(received) == DATA[:300000]
        # A Range request after the drops are used up works normally.
        async with session.get(http_server.url(path), headers={"Range": "bytes=300000-"}) as r:
            assert r.status == 206
            assert await r.read() == DATA[300000:]
    assert http_server.drops_remaining(path) == 0
    assert http_server.bytes_sent(path) == 2 * 300000 + (SIZE - 300000)
    assert http_server.request_count(path) == 3


def test_drop_on_range_request_and_head_does_not_consume(http_server: RangeHTTPServer) -> None:
    path = "/drop/10/disk.img"
    http_server.set_drops(path, 1)
    assert request(http_server, path, "HEAD")[0] == 200
    with pytest.raises(http.client.IncompleteRead) as exc_info:
        request(http_server, path, headers={"Range": "bytes=100-"})
    assert exc_info.value.partial == DATA[100:110]
    assert request(http_server, path, headers={"Range": "bytes=100-"})[2] == DATA[100:]


def test_short_always_half(http_server: RangeHTTPServer) -> None:
    for _ in range(2):
        with pytest.raises(http.client.IncompleteRead) as exc_info:
            request(http_server, "/short/disk.img")
        assert exc_info.value.partial == DATA[: SIZE // 2]
    status, headers, _ = request(http_server, "/short/disk.img", "HEAD")
    assert (status, headers["Content-Length"]) == (200, str(SIZE))
    assert http_server.bytes_sent("/short/disk.img") == 2 * (SIZE // 2)


def test_change(http_server: RangeHTTPServer) -> None:
    inverted = bytes(b ^ 0xFF for b in DATA)
    status, headers, _ = request(http_server, "/change/disk.img", "HEAD")
    assert (status, headers["ETag"]) == (200, '"v1"')
    status, _, body = request(
        http_server, "/change/disk.img", headers={"If-Match": '"v1"', "Range": "bytes=0-"}
    )
    assert (status, body) == (412, b"")
    status, headers, body = request(http_server, "/change/disk.img", headers={"Range": "bytes=10-19"})
    assert (status, headers["ETag"], body) == (206, '"v2"', inverted[10:20])

    status, headers, body = request(http_server, "/change-noifmatch/disk.img")
    assert (status, headers["ETag"], body) == (200, '"v1"', DATA)
    status, headers, body = request(
        http_server, "/change-noifmatch/disk.img", headers={"If-Match": '"v1"', "Range": "bytes=0-99"}
    )
    assert (status, headers["ETag"], body) == (206, '"v2"', inverted[:100])

    http_server.reset_faults()
    assert request(http_server, "/change/disk.img")[1]["ETag"] == '"v1"'


@pytest.mark.asyncio
async def test_slow_and_cancel_mid_transfer(http_server: RangeHTTPServer) -> None:
    http_server.slow_bytes_per_sec = 2 * MIB
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        async with session.get(http_server.url("/slow/disk.img"), headers={"Range": "bytes=0-419429"}) as r:
            assert await r.read() == DATA[:419430]
        assert time.monotonic() - t0 >= 0.15  # 0.4 MiB at 2 MiB/s = 0.2 s

        http_server.slow_bytes_per_sec = 256 * 1024  # would take ~4 s in full
        t0 = time.monotonic()
        async with session.get(http_server.url("/slow/disk.img")) as r:
            first = await r.content.readexactly(1000)
            r.close()  # cancel mid-transfer
        assert first == DATA[:1000]
        assert time.monotonic() - t0 < 2
    await asyncio.sleep(0.3)
    assert 0 < http_server.bytes_sent("/slow/disk.img") - 419430 < SIZE
    # The server is still healthy.
    async with aiohttp.ClientSession() as session, session.get(http_server.url("/sub/small.bin")) as r:
        assert await r.read() == b"0123456789"


def test_stats_and_reset(http_server: RangeHTTPServer) -> None:
    request(http_server, "/disk.img", headers={"Range": "bytes=0-0", "If-Match": '"x"'})
    request(http_server, "/disk.img", "HEAD")
    log = http_server.log
    assert [(r.method, r.path, r.range, r.if_match, r.status) for r in log] == [
        ("GET", "/disk.img", "bytes=0-0", '"x"', 412),
        ("HEAD", "/disk.img", None, None, 200),
    ]
    assert http_server.request_counts == {"/disk.img": 2}
    http_server.reset_stats()
    assert http_server.log == []
    assert http_server.request_count() == 0
    assert http_server.bytes_sent() == 0


def test_huge_sparse_file_offsets(http_root: Path) -> None:
    big = http_root / "big.raw"
    with big.open("wb") as f:
        f.truncate(5 * 1024**3)  # sparse: no disk used
        f.seek(5 * 1024**3 - 4)
        f.write(b"TAIL")
    with RangeHTTPServer(http_root) as server:
        status, headers, body = request(server, "/big.raw", headers={"Range": "bytes=-6"})
        assert (status, body) == (206, b"\0\0TAIL")
        assert headers["Content-Range"] == f"bytes {5 * 1024**3 - 6}-{5 * 1024**3 - 1}/{5 * 1024**3}"
        assert request(server, "/big.raw", "HEAD")[1]["Content-Length"] == str(5 * 1024**3)


# --------------------------------------------------------------------------------------------------------
# S3 stores (moto, Ceph RGW) and MotoServer itself
# --------------------------------------------------------------------------------------------------------


def test_store_env_in_subprocess(store: S3Store, bucket: str) -> None:
    """The environment a store hands the CLI reaches it with its own keys, and nothing leaks in."""
    env = store.env({**os.environ, "AWS_PROFILE": "leaky", "AWS_SESSION_TOKEN": "leaky"})
    assert "AWS_PROFILE" not in env
    assert "AWS_SESSION_TOKEN" not in env
    assert env["AWS_ENDPOINT_URL"] == store.endpoint
    assert Path(env["AWS_CONFIG_FILE"]).read_bytes() == b""
    assert Path(env["AWS_SHARED_CREDENTIALS_FILE"]).read_bytes() == b""
    code = "import boto3; print(' '.join(b['Name'] for b in boto3.client('s3').list_buckets()['Buckets']))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    assert bucket in out.stdout.split()


def test_moto_reset(moto: MotoServer) -> None:
    s3 = moto.client()
    bucket = moto.new_bucket()
    moto.reset()
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


# --------------------------------------------------------------------------------------------------------
# S3FaultProxy
# --------------------------------------------------------------------------------------------------------


def test_proxy_relays_transparently(
    store: S3Store, proxy: S3FaultProxy, new_bucket: Callable[[Any], str]
) -> None:
    direct = store.client()
    via = proxy.client()
    bucket = new_bucket(via)
    body = os.urandom(3 * MIB + 5)
    put = via.put_object(Bucket=bucket, Key="dir/a b+c.img", Body=body, ContentType="application/x-raw")
    head_direct = direct.head_object(Bucket=bucket, Key="dir/a b+c.img")
    head_via = via.head_object(Bucket=bucket, Key="dir/a b+c.img")
    assert put["ETag"] == head_direct["ETag"] == head_via["ETag"]
    assert head_via["ContentLength"] == len(body)
    assert head_via["ContentType"] == "application/x-raw"
    assert via.get_object(Bucket=bucket, Key="dir/a b+c.img")["Body"].read() == body
    ranged = via.get_object(Bucket=bucket, Key="dir/a b+c.img", Range="bytes=-7", IfMatch=put["ETag"])
    assert (ranged["ContentRange"], ranged["Body"].read()) == (
        f"bytes {len(body) - 7}-{len(body) - 1}/{len(body)}",
        body[-7:],
    )
    with pytest.raises(ClientError) as exc_info:
        via.get_object(Bucket=bucket, Key="dir/a b+c.img", IfMatch='"0000"')
    assert exc_info.value.response["Error"]["Code"] == "PreconditionFailed"
    ops = [(r.operation, r.status) for r in proxy.log]
    assert ops == [
        ("CreateBucket", 200),
        ("PutObject", 200),
        ("HeadObject", 200),
        ("GetObject", 200),
        ("GetObject", 206),
        ("GetObject", 412),
    ]
    assert proxy.log[1].path == f"/{bucket}/dir/a b+c.img"


def _multipart(client: Any, bucket: str, key: str, parts: list[bytes]) -> dict[str, Any]:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    done = []
    # Upload in reverse order so the Complete body order is a real assertion.
    for n in reversed(range(1, len(parts) + 1)):
        r = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=parts[n - 1])
        done.append({"PartNumber": n, "ETag": r["ETag"]})
    done.sort(key=lambda p: p["PartNumber"])
    result: dict[str, Any] = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    return result


PARTS = [b"a" * (5 * MIB), b"b" * (5 * MIB), b"c" * 1000]


def test_proxy_upload_part_500_injection_and_log(
    proxy: S3FaultProxy, new_bucket: Callable[[Any], str]
) -> None:
    strict = proxy.client(retries={"mode": "standard", "total_max_attempts": 1})
    bucket = new_bucket(strict)
    proxy.fail_upload_part(times=1, status=500, part_number=2)
    upload_id = strict.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    strict.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=1, Body=b"x" * 10)
    with pytest.raises(ClientError) as exc_info:
        strict.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=2, Body=b"y" * 10)
    assert exc_info.value.response["Error"]["Code"] == "InternalError"
    assert exc_info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert proxy.pending_faults() == 0
    strict.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=2, Body=b"y" * 10)
    parts = [r for r in proxy.log if r.operation == "UploadPart"]
    assert [(r.part_number, r.status, r.injected) for r in parts] == [
        (1, 200, False),
        (2, 500, True),
        (2, 200, False),
    ]
    assert parts[1].query == {"partNumber": "2", "uploadId": upload_id}
    # moto never saw the injected request
    listed = strict.list_parts(Bucket=bucket, Key="k", UploadId=upload_id)["Parts"]
    assert [p["PartNumber"] for p in listed] == [1, 2]


@pytest.mark.parametrize(("status", "code"), [(403, "AccessDenied"), (503, "SlowDown")])
def test_proxy_upload_part_error_codes(
    proxy: S3FaultProxy, new_bucket: Callable[[Any], str], status: int, code: str
) -> None:
    strict = proxy.client(retries={"mode": "standard", "total_max_attempts": 1})
    bucket = new_bucket(strict)
    proxy.fail_upload_part(status=status)
    upload_id = strict.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    with pytest.raises(ClientError) as exc_info:
        strict.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=7, Body=b"z")
    assert exc_info.value.response["Error"]["Code"] == code
    assert exc_info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


def test_proxy_botocore_retries_absorb_one_500(proxy: S3FaultProxy, new_bucket: Callable[[Any], str]) -> None:
    client = proxy.client(retries={"mode": "standard", "total_max_attempts": 3})
    bucket = new_bucket(client)
    proxy.fail_upload_part(times=1, status=500, part_number=1)
    _multipart(client, bucket, "big", PARTS)
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == b"".join(PARTS)
    assert proxy.upload_part_numbers() == [3, 2, 1, 1]  # botocore retried part 1 itself
    assert proxy.upload_part_numbers(include_injected=False) == [3, 2, 1]
    assert proxy.upload_part_numbers()[-1] == 1
    assert proxy.completed_part_numbers() == [1, 2, 3]


def test_proxy_complete_200_with_error_body(proxy: S3FaultProxy, new_bucket: Callable[[Any], str]) -> None:
    strict = proxy.client(retries={"mode": "standard", "total_max_attempts": 1})
    bucket = new_bucket(strict)
    proxy.fail_complete_in_body()
    with pytest.raises(ClientError) as exc_info:
        _multipart(strict, bucket, "k", PARTS[2:])
    # botocore turns "200 + <Error>" into an error (status rewritten to 500 for its retry logic)
    assert exc_info.value.response["Error"]["Code"] == "InternalError"
    complete = proxy.records("CompleteMultipartUpload")
    assert [(r.status, r.injected) for r in complete] == [(200, True)]
    assert complete[0].completed_part_numbers() == [1]
    assert b"<PartNumber>1</PartNumber>" in (complete[0].body or b"")
    with pytest.raises(ClientError):
        strict.head_object(Bucket=bucket, Key="k")  # never completed upstream

    # With retries, botocore retries the Complete by itself and succeeds.
    retrying = proxy.client(retries={"mode": "standard", "total_max_attempts": 3})
    proxy.fail_complete_in_body()
    _multipart(retrying, bucket, "k2", PARTS[2:])
    assert [(r.status, r.injected) for r in proxy.records("CompleteMultipartUpload")][1:] == [
        (200, True),
        (200, False),
    ]


@pytest.mark.asyncio
async def test_proxy_with_aiobotocore(store: S3Store, proxy: S3FaultProxy) -> None:
    session = get_session()
    bucket = store.new_bucket()
    async with session.create_client(
        "s3",
        endpoint_url=proxy.endpoint,
        aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key,
        region_name=store.REGION,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    ) as client:
        upload_id = (await client.create_multipart_upload(Bucket=bucket, Key="k"))["UploadId"]
        proxy.fail_upload_part(status=500)
        with pytest.raises(ClientError):
            await client.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=1, Body=PARTS[0])
        etags = []
        for n, body in enumerate(PARTS[:2], start=1):
            r = await client.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=n, Body=body)
            etags.append({"PartNumber": n, "ETag": r["ETag"]})
        await client.complete_multipart_upload(
            Bucket=bucket, Key="k", UploadId=upload_id, MultipartUpload={"Parts": etags}
        )
        obj = await client.get_object(Bucket=bucket, Key="k", Range="bytes=5242878-5242881")
        async with obj["Body"] as stream:
            assert await stream.read() == b"aabb"
    assert proxy.upload_part_numbers() == [1, 1, 2]
    assert proxy.completed_part_numbers() == [1, 2]
    store.remove_bucket(bucket)


def test_moto_single_server_header(moto: MotoServer) -> None:
    """aiohttp in dev mode rejects moto's stock duplicate Server header; our bootstrap removes it."""

    def server_headers(server: MotoServer) -> list[str]:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        try:
            conn.request("GET", "/no-such-bucket-here")
            resp = conn.getresponse()
            resp.read()
            return resp.headers.get_all("Server") or []
        finally:
            conn.close()

    assert len(server_headers(moto)) == 1
    with MotoServer(single_server_header=False) as stock:  # plain `python -m moto.server`
        assert len(server_headers(stock)) == 2
