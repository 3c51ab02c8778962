"""HTTP(S) and S3 sources and the S3 sink, against real servers on loopback.

Every S3 test runs against two stores (the `store` fixture of conftest.py): moto's server, as its own
process so the real aiobotocore HTTP stack is exercised, and Ceph RADOS Gateway, the object store the
operators of this product run. Faults are injected by a proxy in front of either store and by the HTTP
test server, never by patching the code under test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import RangeHTTPServer, S3FaultProxy, S3Store

from tests.helpers import MiB, error_line, imgpipe, make_raw, qemu_check, qemu_compare, summary_of


@pytest.fixture
def s3proxy(store: S3Store) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(store) as p:
        yield p


def _env(server: S3Store | S3FaultProxy, **extra: str) -> dict[str, str]:
    env = server.env({})
    env.update(extra)
    return env


def _download(store: S3Store, bucket: str, key: str, path: Path) -> Path:
    store.client().download_file(bucket, key, str(path))
    return path


def _no_uploads_left(store: S3Store, bucket: str) -> None:
    """Asked of the store itself (ListMultipartUploads), not of our own bookkeeping."""
    assert store.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def _no_object(store: S3Store, bucket: str, key: str) -> None:
    keys = [o["Key"] for o in store.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert key not in keys


# ---------------------------------------------------------------- HTTP sources


def test_http_ranged_to_file(tmp_path: Path, http: RangeHTTPServer) -> None:
    src = make_raw(tmp_path / "www" / "disk.raw", 21 * MiB + 513, seed=11)
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", http.url("/disk.raw"), str(dst), "--json"))
    qemu_check(dst)
    qemu_compare(src, dst)
    assert s["bytes_read"] == src.stat().st_size
    ranges = [r.range for r in http.log if r.method == "GET"]
    assert all(ranges), "every GET is a ranged GET"
    assert all(r.if_match for r in http.log[1:] if r.method == "GET"), "ranges are pinned to the ETag"
    # Each byte fetched once, plus the 512-byte tail read for a fixed-VHD footer.
    assert http.bytes_sent() == src.stat().st_size + 512


def test_http_without_range_support(tmp_path: Path, http: RangeHTTPServer) -> None:
    src = make_raw(tmp_path / "www" / "disk.raw", 9 * MiB + 7, seed=12)
    dst = tmp_path / "out.qcow2"
    summary_of(imgpipe("convert", http.url("/norange/disk.raw"), str(dst), "--json"))
    qemu_check(dst)
    qemu_compare(src, dst)
    assert http.request_count() == 1


def test_http_redirect_resolved_once(tmp_path: Path, http: RangeHTTPServer) -> None:
    src = make_raw(tmp_path / "www" / "disk.raw", 18 * MiB, seed=13)
    dst = tmp_path / "out.qcow2"
    summary_of(imgpipe("convert", http.url("/redirect/disk.raw"), str(dst), "--json"))
    qemu_compare(src, dst)
    assert http.redirects_served == 1
    assert http.request_count("/disk.raw") > 3  # the ranges went straight to the target


def test_http_dropped_connection_resumes(tmp_path: Path, http: RangeHTTPServer) -> None:
    src = make_raw(tmp_path / "www" / "disk.raw", 13 * MiB + 99, seed=14)
    dst = tmp_path / "out.qcow2"
    path = "/drop/100000/disk.raw"
    http.set_drops(path, 3)
    summary_of(imgpipe("convert", http.url(path), str(dst), "--json", env={"IMGPIPE_RETRY_BACKOFF": "0.01"}))
    assert http.drops_remaining(path) == 0
    qemu_check(dst)
    qemu_compare(src, dst)
    resumed = [r.range for r in http.log if r.range and not r.range.startswith("bytes=0-")]
    assert any(r.startswith("bytes=100000-") for r in resumed), resumed


def test_http_short_body_is_an_error_not_eof(tmp_path: Path, http: RangeHTTPServer) -> None:
    make_raw(tmp_path / "www" / "disk.raw", 5 * MiB, seed=15)
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", http.url("/short/disk.raw"), str(dst), env={"IMGPIPE_RETRY_BACKOFF": "0.01"})
    assert p.returncode == 1
    assert "failed" in error_line(p)
    assert not dst.exists()


@pytest.mark.parametrize("prefix", ["change", "change-noifmatch"])
def test_http_source_replaced_mid_read_is_refused(tmp_path: Path, http: RangeHTTPServer, prefix: str) -> None:
    make_raw(tmp_path / "www" / "disk.raw", 12 * MiB, seed=16)
    dst = tmp_path / "out.qcow2"
    p = imgpipe("convert", http.url(f"/{prefix}/disk.raw"), str(dst))
    assert p.returncode == 1
    assert "changed while it was being read" in error_line(p)
    assert not dst.exists()
    assert [f for f in tmp_path.iterdir() if f.name != "www"] == []


def test_http_404_is_exit_1(tmp_path: Path, http: RangeHTTPServer) -> None:
    p = imgpipe("convert", http.url("/missing.raw"), str(tmp_path / "o.qcow2"))
    assert p.returncode == 1
    assert "404" in error_line(p)


# ---------------------------------------------------------------- S3


def test_http_to_s3_multipart_header_part_last(
    tmp_path: Path, http: RangeHTTPServer, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    src = tmp_path / "www" / "disk.raw"
    src.write_bytes(os.urandom(23 * MiB) + bytes(9 * MiB) + os.urandom(MiB + 5))
    s = summary_of(
        imgpipe("convert", http.url("/disk.raw"), f"s3://{bucket}/out.qcow2", "--json", env=_env(s3proxy))
    )
    out = _download(store, bucket, "out.qcow2", tmp_path / "out.qcow2")
    qemu_check(out)
    qemu_compare(src, out)
    assert s["output_size"] == out.stat().st_size
    parts = s3proxy.upload_part_numbers()
    assert len(parts) >= 3
    assert parts[-1] == 1, f"part 1 (the header) must be uploaded last: {parts}"
    assert s3proxy.completed_part_numbers() == sorted(parts)
    _no_uploads_left(store, bucket)


def test_s3_to_s3(tmp_path: Path, store: S3Store, bucket: str) -> None:
    src = make_raw(tmp_path / "disk.raw", 17 * MiB + 1000, seed=21)
    store.client().upload_file(str(src), bucket, "in/disk.raw")
    src_url, dst_url = f"s3://{bucket}/in/disk.raw", f"s3://{bucket}/out/disk.qcow2"
    s = summary_of(imgpipe("convert", src_url, dst_url, "--json", env=_env(store)))
    out = _download(store, bucket, "out/disk.qcow2", tmp_path / "o.qcow2")
    qemu_check(out)
    qemu_compare(src, out)
    assert s["source_requests"] >= 5  # HEAD, tail, ranged GETs


def test_s3_to_s3_compressed_multipart(tmp_path: Path, store: S3Store, bucket: str) -> None:
    """Compressed clusters through the one-pass S3 layout: several parts, header part last, qemu reads
    every compressed cluster back identically."""
    from tests.test_compress import make_mixed

    src = make_mixed(tmp_path / "disk.raw", 40 * MiB + 3000, seed=5)
    store.client().upload_file(str(src), bucket, "in/mixed.raw")
    s = summary_of(
        imgpipe(
            "convert",
            f"s3://{bucket}/in/mixed.raw",
            f"s3://{bucket}/out/mixed.qcow2",
            "--compress",
            "zstd",
            "--json",
            env=_env(store, IMGPIPE_PART_SIZE="5M"),
        )
    )
    out = _download(store, bucket, "out/mixed.qcow2", tmp_path / "o.qcow2")
    qemu_check(out)
    qemu_compare(src, out)
    assert s["compressed_clusters"] > 0
    assert s["output_size"] == out.stat().st_size > 10 * MiB  # several 5 MiB parts
    _no_uploads_left(store, bucket)


def test_small_output_is_a_single_put(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    src = make_raw(tmp_path / "disk.raw", 2 * MiB + 17, seed=22)
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/small.qcow2", "--json", env=_env(s3proxy)))
    assert s3proxy.upload_part_numbers() == []
    assert [r.operation for r in s3proxy.log].count("PutObject") == 1
    out = _download(store, bucket, "small.qcow2", tmp_path / "o.qcow2")
    qemu_check(out)
    qemu_compare(src, out)


def test_raw_output_to_s3(tmp_path: Path, store: S3Store, bucket: str) -> None:
    src = make_raw(tmp_path / "disk.raw", 14 * MiB + 3, seed=23, data_fraction=0.01)
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.raw", "-O", "raw", "--json", env=_env(store)))
    assert _download(store, bucket, "o.raw", tmp_path / "o.raw").read_bytes() == src.read_bytes()


def test_part_upload_500_then_success(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(26 * MiB))
    s3proxy.fail_upload_part(times=1, status=500, part_number=2)
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=_env(s3proxy)))
    injected = [r for r in s3proxy.log if r.injected]
    assert len(injected) == 1
    assert injected[0].part_number == 2
    out = _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2")
    qemu_check(out)
    qemu_compare(src, out)
    _no_uploads_left(store, bucket)


def test_slowdown_is_retried(tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(20 * MiB))
    s3proxy.fail_upload_part(times=2, status=503, code="SlowDown")
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=_env(s3proxy)))
    assert len([r for r in s3proxy.log if r.injected]) == 2
    qemu_compare(src, _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2"))


def test_failure_mid_job_leaves_no_object_and_no_upload(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(30 * MiB))
    s3proxy.fail_upload_part(times=50, status=403, code="AccessDenied", part_number=3)
    p = imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", env=_env(s3proxy))
    assert p.returncode == 1
    assert "access denied" in error_line(p).lower()
    assert any(r.operation == "AbortMultipartUpload" for r in s3proxy.log)
    _no_uploads_left(store, bucket)
    _no_object(store, bucket, "o.qcow2")


def test_source_failure_mid_job_aborts_the_upload(
    tmp_path: Path, http: RangeHTTPServer, store: S3Store, bucket: str
) -> None:
    src = tmp_path / "www" / "disk.raw"
    src.write_bytes(os.urandom(40 * MiB))
    p = imgpipe(
        "convert",
        http.url("/short/disk.raw"),
        f"s3://{bucket}/o.qcow2",
        env=_env(store, IMGPIPE_RETRY_BACKOFF="0.01", IMGPIPE_READ_CONCURRENCY="1"),
    )
    assert p.returncode == 1
    _no_uploads_left(store, bucket)
    _no_object(store, bucket, "o.qcow2")


def test_complete_answering_200_with_error_body(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(20 * MiB))
    s3proxy.fail_complete_in_body(times=1)
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=_env(s3proxy)))
    completes = s3proxy.records("CompleteMultipartUpload")
    assert completes[0].injected
    assert len(completes) >= 2  # the error in the body was seen and the call retried
    qemu_compare(src, _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2"))
    _no_uploads_left(store, bucket)


def test_s3_source_replaced_mid_read_is_refused(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """The object is overwritten after the HEAD, before the first ranged GET: If-Match must catch it."""
    c = store.client()
    c.put_object(Bucket=bucket, Key="disk.raw", Body=os.urandom(12 * MiB))
    s3proxy.before_first(
        "GetObject", lambda: c.put_object(Bucket=bucket, Key="disk.raw", Body=os.urandom(12 * MiB))
    )
    p = imgpipe("convert", f"s3://{bucket}/disk.raw", str(tmp_path / "o.qcow2"), env=_env(s3proxy))
    assert p.returncode == 1
    assert "changed while it was being read" in error_line(p)
    gets = s3proxy.records("GetObject")
    assert gets[0].status == 412
    assert not (tmp_path / "o.qcow2").exists()


def test_missing_s3_object_is_exit_1(tmp_path: Path, store: S3Store, bucket: str) -> None:
    p = imgpipe("convert", f"s3://{bucket}/nope.raw", str(tmp_path / "o.qcow2"), env=_env(store))
    assert p.returncode == 1
    assert "no such object" in error_line(p)


def test_s3_url_without_key_is_usage_error(tmp_path: Path, store: S3Store) -> None:
    p = imgpipe("convert", "s3://only-bucket", str(tmp_path / "o.qcow2"), env=_env(store))
    assert p.returncode == 2


def test_interrupt_aborts_the_upload(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """Ctrl-C mid-upload: exit 130, the multipart upload aborted, no object."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(160 * MiB))
    # Part 3 is held, so the job cannot finish before the signal (160 MiB took 2.5 s under load).
    s3proxy.delay_upload_part(3, 8.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMGPIPE_"))}
    env.update(_env(s3proxy))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "convert", str(src), f"s3://{bucket}/o.qcow2", "--no-progress"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        # A user's terminal delivers Ctrl-C; a job started in the background (nohup, `cmd &`) inherits
        # SIGINT ignored, and Python then installs no handler. Start the child as from a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while not s3proxy.upload_part_numbers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s3proxy.upload_part_numbers(), "the upload never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-500:]
    assert any(r.operation == "AbortMultipartUpload" for r in s3proxy.log)
    _no_uploads_left(store, bucket)
    _no_object(store, bucket, "o.qcow2")


# ---------------------------------------------------------------- details where S3 stores differ


def test_parts_completed_in_ascending_order_whatever_the_upload_order(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """Part 2 is held back so parts 3.. reach the store first; the completion list must still ascend.

    AWS refuses a list out of order (InvalidPartOrder), moto assembles it in list order (the object
    would be wrong) and Ceph sorts it: only the list itself shows the mistake on every store.
    """
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(45 * MiB))
    s3proxy.delay_upload_part(2, 1.5)
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=_env(s3proxy)))
    uploads = [r for r in s3proxy.records("UploadPart") if r.status == 200]
    stored_order = [r.part_number for r in sorted(uploads, key=lambda r: r.answered)]
    assert len(stored_order) >= 5
    assert stored_order != sorted(stored_order), f"the delay did not reorder the uploads: {stored_order}"
    assert stored_order.index(2) > stored_order.index(3)
    assert s3proxy.completed_part_numbers() == sorted(stored_order)
    out = _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2")
    qemu_check(out)
    qemu_compare(src, out)
    _no_uploads_left(store, bucket)


def test_s3_source_overwritten_mid_conversion_is_refused(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """S3 to S3: the source is overwritten after several ranges were read; If-Match refuses the rest,
    and the half-written destination leaves neither an object nor an open multipart upload."""
    c = store.client()
    c.put_object(Bucket=bucket, Key="in/disk.raw", Body=os.urandom(40 * MiB))
    s3proxy.before_first(
        "GetObject",
        lambda: c.put_object(Bucket=bucket, Key="in/disk.raw", Body=os.urandom(40 * MiB)),
        skip=8,
    )
    p = imgpipe(
        "convert",
        f"s3://{bucket}/in/disk.raw",
        f"s3://{bucket}/out/o.qcow2",
        env=_env(s3proxy, IMGPIPE_READ_CONCURRENCY="2"),
    )
    assert p.returncode == 1, p.stderr.decode()[-1500:]
    assert "changed while it was being read" in error_line(p)
    gets = s3proxy.records("GetObject")
    assert [g.status for g in gets[:8]] == [206] * 8
    assert 412 in [g.status for g in gets[8:]]
    assert all(g.headers.get("if-match") for g in gets[1:]), "every range is pinned to the first ETag"
    _no_uploads_left(store, bucket)
    _no_object(store, bucket, "out/o.qcow2")


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_default_checksum_settings_work(tmp_path: Path, store: S3Store, bucket: str, tls: bool) -> None:
    """The product's defaults against a custom endpoint, over HTTP and over HTTPS, both directions.

    botocore's own default ("when_supported") sends, over HTTPS, every part as aws-chunked with a CRC32
    trailer and no Content-Length; Ceph RGW 16.2 refuses that (MissingContentLength). The product asks
    for checksums only when required, so every upload carries a plain Content-Length body on both stores.
    """
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(19 * MiB) + bytes(4 * MiB) + os.urandom(MiB))
    store.client().upload_file(str(src), bucket, "in/disk.raw")
    with S3FaultProxy(store, tls=tls) as proxy:
        assert proxy.endpoint.startswith("https://" if tls else "http://")
        env = proxy.env({})
        summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=env))
        back = tmp_path / "back.qcow2"
        summary_of(imgpipe("convert", f"s3://{bucket}/in/disk.raw", str(back), "--json", env=env))
        uploads = proxy.records("UploadPart")
        gets = proxy.records("GetObject")
    assert len(uploads) >= 3
    for r in uploads:
        assert r.status == 200
        assert r.headers.get("content-length", "").isdigit(), r.headers
        assert "aws-chunked" not in r.headers.get("content-encoding", "")
        assert "x-amz-trailer" not in r.headers
    assert len(gets) >= 3
    assert all(g.status == 206 for g in gets)
    out = _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2")
    qemu_check(out)
    qemu_compare(src, out)
    qemu_check(back)
    qemu_compare(src, back)


def test_users_checksum_choice_wins(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """AWS_REQUEST_CHECKSUM_CALCULATION set by the user is obeyed: CRC32 on every part, on both stores."""
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(20 * MiB))
    env = _env(s3proxy, AWS_REQUEST_CHECKSUM_CALCULATION="when_supported")
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=env))
    uploads = s3proxy.records("UploadPart")
    assert len(uploads) >= 2
    assert all(r.headers.get("x-amz-checksum-crc32") for r in uploads), [r.headers for r in uploads]
    qemu_compare(src, _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2"))


def test_lost_complete_answer_is_retried_and_verified(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """CompleteMultipartUpload reaches the store but its answer is lost (the client sees a 500): botocore
    retries it, both stores answer the retry with success, and the HEAD check verifies the object."""
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(20 * MiB))
    s3proxy.lose_complete_answer(times=1)
    summary_of(imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", "--json", env=_env(s3proxy)))
    completes = s3proxy.records("CompleteMultipartUpload")
    assert [(r.status, r.injected) for r in completes] == [(500, True), (200, False)]
    qemu_compare(src, _download(store, bucket, "o.qcow2", tmp_path / "o.qcow2"))
    _no_uploads_left(store, bucket)


def test_lost_complete_answer_then_no_such_upload_leaves_nothing(
    tmp_path: Path, store: S3Store, s3proxy: S3FaultProxy, bucket: str
) -> None:
    """As above, but the retried Complete hears NoSuchUpload (a store that forgets completed uploads):
    the job fails, and the object the store did assemble, never verified, is deleted."""
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(20 * MiB))
    s3proxy.lose_complete_answer(times=1)
    s3proxy.fail_complete(times=1, status=404, code="NoSuchUpload")
    p = imgpipe("convert", str(src), f"s3://{bucket}/o.qcow2", env=_env(s3proxy))
    assert p.returncode == 1, p.stderr.decode()[-1500:]
    assert [(r.status, r.injected) for r in s3proxy.records("CompleteMultipartUpload")] == [
        (500, True),
        (404, True),
    ]
    assert [r.status for r in s3proxy.records("AbortMultipartUpload")] == [404]
    assert [r.status for r in s3proxy.records("DeleteObject")] == [204]
    _no_uploads_left(store, bucket)
    _no_object(store, bucket, "o.qcow2")
