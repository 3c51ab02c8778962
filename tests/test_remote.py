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


@pytest.fixture
def http(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    root = tmp_path / "www"
    root.mkdir()
    with RangeHTTPServer(root) as s:
        yield s


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMGPIPE_"))}
    env.update(_env(s3proxy))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "convert", str(src), f"s3://{bucket}/o.qcow2", "--no-progress"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
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
