"""`imgpipe worker` as separate processes against moto's server (S3 and SQS) on loopback.

Nothing is mocked: workers long-poll real SQS queues, read real S3/HTTP/file sources, write real
multipart uploads; qemu-img compares every output with its source. Timeouts are short (visibility 4 s,
long poll 1 s) so redelivery happens within a test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from servers import MotoServer, RangeHTTPServer, _http_request, free_port

from tests.helpers import ROOT, MiB, make_raw, qemu_compare

pytestmark = pytest.mark.slow

FAST = {
    "IMGPIPE_WAIT_TIME": "1",
    "IMGPIPE_VISIBILITY_TIMEOUT": "4",
    "IMGPIPE_HEARTBEAT_INTERVAL": "1",
    "IMGPIPE_RETRY_DELAY": "1",
    "IMGPIPE_RETRY_DELAY_MAX": "2",
    "IMGPIPE_METRICS_PORT": "0",
    "IMGPIPE_CONCURRENCY": "2",
    "IMGPIPE_MEMORY_LIMIT": "320M",
}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as m:
        yield m


class Aws:
    """boto3 clients for the test side, and one set of queues + buckets per test."""

    def __init__(self, moto: MotoServer, max_receives: int = 3) -> None:
        self.moto = moto
        kw: dict[str, Any] = {
            "endpoint_url": moto.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        self.s3 = boto3.client("s3", **kw)
        self.sqs = boto3.client("sqs", **kw)
        tag = uuid.uuid4().hex[:8]
        self.src, self.dst = f"src-{tag}", f"dst-{tag}"
        self.s3.create_bucket(Bucket=self.src)
        self.s3.create_bucket(Bucket=self.dst)
        self.dlq = self.sqs.create_queue(QueueName=f"dlq-{tag}")["QueueUrl"]
        arn = self.arn(self.dlq)
        redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": max_receives})
        self.jobs = self.sqs.create_queue(
            QueueName=f"jobs-{tag}", Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "4"}
        )["QueueUrl"]
        self.results = self.sqs.create_queue(QueueName=f"results-{tag}")["QueueUrl"]

    def arn(self, url: str) -> str:
        attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(attrs["Attributes"]["QueueArn"])

    def send(self, body: Any) -> str:
        text = body if isinstance(body, str) else json.dumps(body)
        return str(self.sqs.send_message(QueueUrl=self.jobs, MessageBody=text)["MessageId"])

    def drain(self, url: str) -> list[dict[str, Any]]:
        """Every message now visible on `url` (deleted as read)."""
        out: list[dict[str, Any]] = []
        while True:
            msgs = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            if not msgs:
                return out
            for m in msgs:
                out.append(m)
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])

    def results_until(self, count: int, timeout: float) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got += [json.loads(m["Body"]) for m in self.drain(self.results)]
            time.sleep(0.2)
        return got

    def queue_counts(self, url: str) -> tuple[int, int]:
        a = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

    def uploads(self) -> list[Any]:
        return list(self.s3.list_multipart_uploads(Bucket=self.dst).get("Uploads", []))

    def fetch(self, key: str, path: Path) -> Path:
        self.s3.download_file(self.dst, key, str(path))
        return path


class WorkerProc:
    """`python -m pipeline worker` as its own process; JSON log lines collected from stderr."""

    def __init__(self, aws: Aws, tmp: Path, *args: str, **env: str) -> None:
        self.log_path = tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
        full = aws.moto.env(os.environ)
        full = {k: v for k, v in full.items() if not k.startswith("IMGPIPE_")}
        full.update(FAST)
        full.update(env)
        full["PYTHONWARNINGS"] = "error::RuntimeWarning"
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "worker",
                "--queue-url",
                aws.jobs,
                "--results-queue-url",
                aws.results,
                *args,
            ],
            env=full,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"event": raw})
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [ln for ln in self.lines() if ln.get("event") == name]

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout} s:\n{self.tail()}") from None

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def aws(moto: MotoServer) -> Aws:
    return Aws(moto)


@pytest.fixture
def workers(aws: Aws, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    started: list[WorkerProc] = []

    def start(*args: str, on: Aws | None = None, **env: str) -> WorkerProc:
        w = WorkerProc(on or aws, tmp_path, *args, **env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def http(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    root = tmp_path / "www"
    root.mkdir()
    with RangeHTTPServer(root, slow_bytes_per_sec=2 * MiB) as s:
        yield s


def _deleted(ws: list[WorkerProc]) -> list[str]:
    return [ln["message_id"] for w in ws for ln in w.events("message deleted")]


def test_three_workers_thirty_mixed_jobs(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path, http: RangeHTTPServer
) -> None:
    """30 jobs from S3, HTTP and local files, of 64 KiB to 12 MiB, some with options: all correct."""
    sizes = [64 * 1024, MiB, 3 * MiB, 12 * MiB + 4096]
    expected: dict[str, tuple[Path, str]] = {}
    for i in range(30):
        raw = make_raw(tmp_path / f"d{i}.raw", sizes[i % len(sizes)], seed=i)
        kind = ("s3", "http", "file")[i % 3]
        if kind == "s3":
            aws.s3.upload_file(str(raw), aws.src, raw.name)
            src = f"s3://{aws.src}/{raw.name}"
        elif kind == "http":
            (http.root / raw.name).write_bytes(raw.read_bytes())
            src = http.url(f"/{raw.name}")
        else:
            src = str(raw)
        job: dict[str, Any] = {"source": src, "destination": f"s3://{aws.dst}/o{i}", "id": f"job-{i}"}
        fmt = "qcow2"
        if i % 5 == 1:
            job["options"] = {"output_format": "raw"}
            fmt = "raw"
        elif i % 5 == 2:
            job["options"] = {"cluster_size": "512K", "compat": "0.10"}
        elif i % 5 == 3:
            job["options"] = {"compress": "zstd"}
        expected[f"job-{i}"] = (raw, fmt)
        aws.send(job)
    ws = [workers("--once") for _ in range(3)]
    for w in ws:
        assert w.wait(240) == 0, w.tail()
    results = aws.results_until(30, 10)
    assert sorted(r["job_id"] for r in results) == sorted(expected)
    assert {r["outcome"] for r in results} == {"done"}, [r for r in results if r["outcome"] != "done"]
    deleted = _deleted(ws)
    assert len(deleted) == len(set(deleted)) == 30  # each message deleted exactly once
    assert aws.queue_counts(aws.jobs) == (0, 0)
    assert aws.uploads() == []
    assert sum(1 for w in ws if w.events("job result")) >= 2  # the work was shared
    for r in results:
        raw, fmt = expected[r["job_id"]]
        out = aws.fetch(r["destination"].rsplit("/", 1)[1], tmp_path / "out")
        qemu_compare(raw, out, "raw", fmt)
        assert r["source_sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
        assert r["bytes_read"] == raw.stat().st_size


def _slow_job(aws: Aws, http: RangeHTTPServer, tmp_path: Path, size: int = 40 * MiB) -> Path:
    raw = make_raw(tmp_path / "slow.raw", size, seed=99)
    (http.root / "slow.raw").write_bytes(raw.read_bytes())
    aws.send(
        {"source": http.url("/slow/slow.raw"), "destination": f"s3://{aws.dst}/slow.qcow2", "id": "slow"}
    )
    return raw


def test_kill9_mid_job_is_redelivered_and_completed(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path, http: RangeHTTPServer
) -> None:
    raw = _slow_job(aws, http, tmp_path)
    a = workers()
    a.wait_for(lambda: len(aws.uploads()) == 1, 60, "a multipart upload")
    a.proc.kill()  # SIGKILL: no cleanup at all
    a.proc.wait()
    assert len(aws.uploads()) == 1  # what a crash leaves
    b = workers()  # not --once: the message stays invisible until its visibility timeout runs out
    [result] = aws.results_until(1, 90)
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait(30) == 0, b.tail()
    assert (result["outcome"], result["receive_count"]) == ("done", 2)
    assert [ln["upload_id"] for ln in b.events("aborted a stale multipart upload")]
    assert aws.uploads() == []
    qemu_compare(raw, aws.fetch("slow.qcow2", tmp_path / "out.qcow2"), "raw", "qcow2")
    assert aws.queue_counts(aws.jobs) == (0, 0)


def test_same_job_twice_at_once(aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "twice.raw", 20 * MiB, seed=5)
    aws.s3.upload_file(str(raw), aws.src, "twice.raw")
    job = {"source": f"s3://{aws.src}/twice.raw", "destination": f"s3://{aws.dst}/twice.qcow2"}
    aws.send(job)
    aws.send(job)
    # Not --once: the worker that gives way gets its message back after the retry delay.
    ws = [workers(IMGPIPE_CONCURRENCY="1") for _ in range(2)]
    results = aws.results_until(2, 60)
    for w in ws:
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0, w.tail()
    assert sorted(r["outcome"] for r in results) == ["done", "duplicate"], results
    assert len(set(_deleted(ws))) == 2
    assert aws.queue_counts(aws.jobs) == (0, 0)
    assert aws.uploads() == []
    out = aws.fetch("twice.qcow2", tmp_path / "out.qcow2")
    qemu_compare(raw, out, "raw", "qcow2")
    # Identical to a single run: the duplicate names the same digest as the run that wrote it.
    assert results[0]["source_sha256"] == results[1]["source_sha256"]
    versions = aws.s3.list_object_versions(Bucket=aws.dst, Prefix="twice.qcow2").get("Versions", [])
    assert len(versions) == 1


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        status, body = _http_request("127.0.0.1", port, "GET", path)
    except OSError:
        return 0, ""
    return status, body.decode()


def test_poison_messages_and_metrics(
    moto: MotoServer, workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    aws = Aws(moto, max_receives=2)
    qcow = tmp_path / "refused.qcow2"  # a delta on a backing file: refused, never retried
    base = make_raw(tmp_path / "base.raw", 1 * MiB, seed=2)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(qcow), "1M"], check=True
    )
    aws.s3.upload_file(str(qcow), aws.src, "refused.qcow2")
    good = make_raw(tmp_path / "good.raw", 2 * MiB, seed=3)
    aws.s3.upload_file(str(good), aws.src, "good.raw")
    bad_json = aws.send("{this is not json")
    v2 = aws.send({"version": 2, "source": "s3://a/b", "destination": "s3://c/d"})
    src = f"s3://{aws.src}"
    aws.send({"source": f"{src}/refused.qcow2", "destination": f"s3://{aws.dst}/r", "id": "refused"})
    aws.send({"source": f"{src}/missing.raw", "destination": f"s3://{aws.dst}/m", "id": "missing"})
    aws.send(
        {
            "source": f"{src}/good.raw",
            "destination": f"s3://{aws.dst}/c",
            "id": "checksum",
            "source_checksum": "sha256:" + "0" * 64,
        }
    )
    aws.send(
        {
            "source": f"{src}/good.raw",
            "destination": f"s3://{aws.dst}/o",
            "id": "options",
            "options": {"cluster_size": 1000},
        }
    )
    aws.send({"source": f"{src}/good.raw", "destination": f"s3://{aws.dst}/good", "id": "good"})
    port = free_port()
    w = workers(on=aws, IMGPIPE_METRICS_PORT=str(port))
    w.wait_for(lambda: _get(port, "/readyz")[0] == 200, 30, "/readyz")
    assert _get(port, "/healthz")[0] == 200
    results = aws.results_until(7, 60)
    by = {r.get("job_id", r["message_id"]): r for r in results}
    assert by[bad_json]["outcome"] == "invalid"
    assert "not JSON" in by[bad_json]["error"]
    assert by[v2]["outcome"] == "invalid"
    assert "version 2" in by[v2]["error"]
    assert by["refused"]["outcome"] == "refused"
    assert by["refused"]["exit_status"] == 3
    assert "qcow2" in by["refused"]["error"]
    assert by["checksum"]["outcome"] == "refused"
    assert "sha256" in by["checksum"]["error"]
    # Missing source: transient, retried with a delay, final after maxReceiveCount receives.
    assert (by["missing"]["outcome"], by["missing"]["receive_count"]) == ("failed", 2)
    assert "no such object" in by["missing"]["error"]
    assert by["options"]["outcome"] == "invalid"
    assert "power of two" in by["options"]["error"]
    assert by["good"]["outcome"] == "done"
    qemu_compare(good, aws.fetch("good", tmp_path / "good.qcow2"), "raw", "qcow2")
    retries = [ln for ln in w.events("job failed; will retry") if ln["job_id"] == "missing"]
    assert [ln["receive_count"] for ln in retries] == [1]
    # Unreadable messages go to the dead-letter queue at once; the missing source via the redrive
    # policy on its next receive (moto moves it when a receive finds it over maxReceiveCount).
    w.wait_for(lambda: aws.queue_counts(aws.jobs) == (0, 0), 20, "the jobs queue to empty")
    dead = sorted(m["Body"] for m in aws.drain(aws.dlq))
    assert "{this is not json" in dead
    assert any('"version": 2' in b for b in dead)
    assert any("missing.raw" in b for b in dead)
    assert any('"cluster_size": 1000' in b for b in dead)
    assert len(dead) == 4
    assert aws.uploads() == []
    status, text = _get(port, "/metrics")
    assert status == 200
    samples = [ln.rsplit(" ", 1) for ln in text.splitlines() if not ln.startswith("#")]
    values = {name: float(value) for name, value in samples}
    assert values['imgpipe_jobs_total{outcome="invalid"}'] == 3
    assert values['imgpipe_jobs_total{outcome="refused"}'] == 2
    assert values['imgpipe_jobs_total{outcome="done"}'] == 1
    assert values['imgpipe_jobs_total{outcome="failed"}'] == 1
    assert values['imgpipe_jobs_total{outcome="retrying"}'] == 1
    assert values["imgpipe_jobs_in_flight"] == 0
    assert values["imgpipe_bytes_read_total"] == 2 * MiB  # the completed job's
    assert "imgpipe_job_seconds_bucket" in text
    assert "imgpipe_receive_seconds_count" in text
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0
    # Every line of a job's run carries its id.
    good_lines = [ln for ln in w.lines() if ln.get("job") == "good"]
    assert {"job started", "job done", "job result"} <= {ln["event"] for ln in good_lines}


def test_sigterm_mid_job_aborts_and_releases_the_message(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path, http: RangeHTTPServer
) -> None:
    _slow_job(aws, http, tmp_path)
    w = workers(IMGPIPE_GRACE_PERIOD="0.5", IMGPIPE_VISIBILITY_TIMEOUT="30", IMGPIPE_HEARTBEAT_INTERVAL="10")
    w.wait_for(lambda: len(aws.uploads()) == 1, 60, "a multipart upload")
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.tail()
    assert time.monotonic() - t0 < 15
    assert aws.uploads() == []
    assert "Contents" not in aws.s3.list_objects_v2(Bucket=aws.dst)
    # Visible again at once, not after the 30 s visibility timeout.
    msgs = aws.sqs.receive_message(QueueUrl=aws.jobs, WaitTimeSeconds=2).get("Messages", [])
    assert len(msgs) == 1
    assert json.loads(msgs[0]["Body"])["id"] == "slow"
    assert w.events("message released for another worker")


def test_second_signal_stops_at_once_cleanly(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path, http: RangeHTTPServer
) -> None:
    _slow_job(aws, http, tmp_path)
    w = workers(IMGPIPE_GRACE_PERIOD="600", IMGPIPE_VISIBILITY_TIMEOUT="30", IMGPIPE_HEARTBEAT_INTERVAL="10")
    w.wait_for(lambda: len(aws.uploads()) == 1, 60, "a multipart upload")
    w.proc.send_signal(signal.SIGTERM)
    w.wait_for(lambda: bool(w.events("signal: no new jobs; running jobs get the grace period")), 10, "1st")
    w.proc.send_signal(signal.SIGINT)
    assert w.wait(30) == 0, w.tail()
    assert aws.uploads() == []
    msgs = aws.sqs.receive_message(QueueUrl=aws.jobs, WaitTimeSeconds=2).get("Messages", [])
    assert len(msgs) == 1


def test_s3_event_notification_is_routed(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    cfg = tmp_path / "worker.toml"
    cfg.write_text(
        f'[[route]]\nbucket = "{aws.src}"\nprefix = "incoming/"\nsuffix = ".img"\n'
        f'destination = "s3://{aws.dst}/images/{{relative_stem}}.qcow2"\n'
        'options = { cluster_size = "128K" }\n'
    )
    aws.s3.put_bucket_notification_configuration(
        Bucket=aws.src,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": aws.arn(aws.jobs), "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    aws.drain(aws.jobs)  # the s3:TestEvent some stores send on configuration
    raw = make_raw(tmp_path / "vm.img", 3 * MiB, seed=8)
    aws.s3.upload_file(str(raw), aws.src, "incoming/team a/vm.img")
    aws.s3.upload_file(str(raw), aws.src, "elsewhere/vm.img")  # no route: acknowledged, ignored
    w = workers("--once", "--config", str(cfg))
    assert w.wait(60) == 0, w.tail()
    [result] = aws.results_until(1, 5)
    assert result["outcome"] == "done"
    assert result["destination"] == f"s3://{aws.dst}/images/team a/vm.qcow2"
    out = aws.fetch("images/team a/vm.qcow2", tmp_path / "vm.qcow2")
    qemu_compare(raw, out, "raw", "qcow2")
    assert (
        json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", str(out)]))["cluster-size"]
        == 128 * 1024
    )
    assert aws.queue_counts(aws.jobs) == (0, 0)
    assert len(w.events("message deleted")) == 2


def test_a_package_job_writes_every_output(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    """A UEC-style tarball through the worker: its disk as qcow2, its kernel copied, each tagged with
    the source's digest, and the result listing them."""
    raw = make_raw(tmp_path / "cloud.img", 3 * MiB, seed=9)
    kernel = bytearray(4096)
    kernel[0x1FE:0x200], kernel[0x202:0x206] = b"\x55\xaa", b"HdrS"
    (tmp_path / "cloud-vmlinuz-virtual").write_bytes(kernel)
    subprocess.run(
        [
            "tar",
            "-C",
            str(tmp_path),
            "-czf",
            str(tmp_path / "uec.tar.gz"),
            "cloud.img",
            "cloud-vmlinuz-virtual",
        ],
        check=True,
    )
    aws.s3.upload_file(str(tmp_path / "uec.tar.gz"), aws.src, "uec.tar.gz")
    aws.send({"source": f"s3://{aws.src}/uec.tar.gz", "destination": f"s3://{aws.dst}/uec/cloud.qcow2"})
    w = workers("--once")
    assert w.wait(60) == 0, w.tail()
    [result] = aws.results_until(1, 5)
    assert result["outcome"] == "done", result
    assert [o["destination"] for o in result["outputs"]] == [
        f"s3://{aws.dst}/uec/cloud.qcow2",
        f"s3://{aws.dst}/uec/cloud.aki",
    ]
    qemu_compare(raw, aws.fetch("uec/cloud.qcow2", tmp_path / "out.qcow2"), "raw", "qcow2")
    assert aws.fetch("uec/cloud.aki", tmp_path / "out.aki").read_bytes() == bytes(kernel)
    for key in ("uec/cloud.qcow2", "uec/cloud.aki"):
        tags = aws.s3.get_object_tagging(Bucket=aws.dst, Key=key)["TagSet"]
        assert {t["Key"]: t["Value"] for t in tags}["imgpipe-sha256"] == result["source_sha256"]
    assert aws.uploads() == []


def test_worker_refuses_bad_settings_with_a_message(aws: Aws, tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[worker]\nconcurrancy = 3\n")
    env = aws.moto.env(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker", "--queue-url", aws.jobs, "--config", str(cfg)],
        env=env,
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert p.returncode == 2
    assert "did you mean 'concurrency'" in p.stderr.decode()


def test_changed_source_is_converted_again_and_same_source_is_not(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    """Identity = source version + options: a new upload of the source replaces the output, a resend
    of the same job is acknowledged without converting, and other options are a different output."""
    job = {"source": f"s3://{aws.src}/v.raw", "destination": f"s3://{aws.dst}/v.qcow2"}
    v1 = make_raw(tmp_path / "v1.raw", 2 * MiB, seed=11)
    aws.s3.upload_file(str(v1), aws.src, "v.raw")
    aws.send(job)
    assert workers("--once").wait(60) == 0
    aws.send(job)
    assert workers("--once").wait(60) == 0
    v2 = make_raw(tmp_path / "v2.raw", 2 * MiB, seed=12)
    aws.s3.upload_file(str(v2), aws.src, "v.raw")
    aws.send(job)
    assert workers("--once").wait(60) == 0
    aws.send({**job, "options": {"cluster_size": "128K"}})
    assert workers("--once").wait(60) == 0
    results = aws.results_until(4, 10)
    assert [r["outcome"] for r in results] == ["done", "duplicate", "done", "done"]
    assert results[1]["source_sha256"] == results[0]["source_sha256"]  # from the output's tag
    assert results[2]["source_sha256"] == hashlib.sha256(v2.read_bytes()).hexdigest()
    out = aws.fetch("v.qcow2", tmp_path / "out.qcow2")
    qemu_compare(v2, out, "raw", "qcow2")
    head = aws.s3.head_object(Bucket=aws.dst, Key="v.qcow2")
    assert head["Metadata"]["imgpipe-source"] == job["source"]
    assert head["Metadata"]["imgpipe-options"] == "qcow2;cluster=131072;compat=1.1"
    tags = aws.s3.get_object_tagging(Bucket=aws.dst, Key="v.qcow2")["TagSet"]
    assert tags == [{"Key": "imgpipe-sha256", "Value": results[3]["source_sha256"]}]


def test_heartbeat_keeps_a_long_job_from_redelivery(
    aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path, http: RangeHTTPServer
) -> None:
    """A job longer than the visibility timeout (4 s) is received once: the heartbeat extends it."""
    raw = _slow_job(aws, http, tmp_path, size=64 * MiB)
    ws = [workers(), workers()]
    [result] = aws.results_until(1, 90)
    for w in ws:
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0, w.tail()
    assert result["outcome"] == "done"
    assert result["receive_count"] == 1
    assert result["seconds"] > 1.5 * 4, "the job was too fast to need a heartbeat; make it slower"
    assert sum(len(w.events("job started")) for w in ws) == 1
    qemu_compare(raw, aws.fetch("slow.qcow2", tmp_path / "out.qcow2"), "raw", "qcow2")


def test_memory_limit_caps_jobs_at_once(aws: Aws, workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    """memory_limit 300M holds one job's budget (137 MiB) beside the runtime: jobs never overlap."""
    raw = make_raw(tmp_path / "m.raw", 3 * MiB, seed=4)
    aws.s3.upload_file(str(raw), aws.src, "m.raw")
    for i in range(4):
        aws.send({"source": f"s3://{aws.src}/m.raw", "destination": f"s3://{aws.dst}/m{i}", "id": f"m{i}"})
    w = workers("--once", IMGPIPE_CONCURRENCY="4", IMGPIPE_MEMORY_LIMIT="300M")
    assert w.wait(60) == 0, w.tail()
    [capped] = w.events("concurrency capped by memory_limit")
    assert (capped["concurrency"], capped["capped"]) == (4, 1)
    spans = sorted(
        (s["timestamp"], d["timestamp"])
        for s, d in zip(w.events("job started"), w.events("job done"), strict=True)
    )
    assert len(spans) == 4
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # ISO timestamps in UTC sort as times
    assert sorted(r["outcome"] for r in aws.results_until(4, 10)) == ["done"] * 4
