"""`imgpipe worker`: long-poll SQS, convert each job through the pipeline, acknowledge by its fate.

Fates: success (or a duplicate whose output already matches) and permanent failures (a refused image,
an invalid job) delete the message; a transient failure leaves it for redelivery after a growing delay
(the queue's redrive policy sends a message that keeps failing to the dead-letter queue); a message that
can never be a job (bad JSON, unknown schema version) goes to the dead-letter queue at once. While a job
runs its message's visibility is extended ahead of expiry. On SIGTERM/SIGINT no more messages are taken,
running jobs get `grace_period` seconds, then their uploads are aborted and their messages made visible
at once; a second signal skips the grace period.

Idempotency: an S3 output carries metadata naming the source (URL, ETag), the options and any expected
checksum, and a tag with the sha256 of the source bytes. A job whose output exists with the same
identity is acknowledged without converting; multipart uploads left at the destination by a crashed
worker are aborted first; the commit is conditional (If-None-Match: * for a new key, If-Match: the ETag
seen for a replaced one) so two workers racing on one key cannot both write it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pipeline import log
from pipeline.errors import ImgpipeError, InputRefused, SinkError, UsageError
from pipeline.jobs import InvalidJob, Job, parse_message
from pipeline.runner import JobHooks, convert, time_boxed
from pipeline.s3util import S3Context, S3Url, error_code, parse_s3_url
from pipeline.settings import Settings
from pipeline.sources import open_source
from pipeline.workerconfig import RUNTIME_RESERVE, WorkerConfig

# hashlib releases the GIL for buffers over 2 KiB; below this a thread hop costs more than the hash.
_THREAD_HASH_MIN = 256 * 1024
_TAG_WAIT_TRIES = 8  # x 0.25 s: how long a duplicate waits for the writer's digest tag
_META_PREFIX = "imgpipe-"


class ChecksumMismatch(InputRefused):
    """The source's sha256 is not the one the job expects: the wrong bytes, retrying will not help."""


class LostRace(SinkError):
    """Another worker is writing the same output: give way, retry later (and find it done)."""


class MemoryBudget:
    """Bytes of job memory (Settings.memory_budget) in use; a job waits until its share fits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Event()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)  # a job bigger than the whole budget runs alone
        while self.used + n > self.capacity:
            self._changed.clear()
            await self._changed.wait()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.jobs = Counter("imgpipe_jobs", "Jobs finished, by outcome", ["outcome"], registry=r)
        self.bytes_read = Counter("imgpipe_bytes_read", "Source bytes read", registry=r)
        self.bytes_written = Counter("imgpipe_bytes_written", "Output bytes written", registry=r)
        self.zero_bytes = Counter("imgpipe_zero_bytes_skipped", "All-zero bytes left unallocated", registry=r)
        self.job_seconds = Histogram(
            "imgpipe_job_seconds",
            "Wall time of a job, memory wait excluded",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.in_flight = Gauge("imgpipe_jobs_in_flight", "Jobs converting now", registry=r)
        self.receive_seconds = Histogram(
            "imgpipe_receive_seconds",
            "SQS ReceiveMessage latency, long poll included",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30),
            registry=r,
        )
        self.memory_reserved = Gauge("imgpipe_memory_reserved_bytes", "Job memory budget in use", registry=r)


def options_fingerprint(s: Settings) -> str:
    """The output options that change the bytes of the output: part of a job's identity."""
    if s.output_format == "raw":
        return "raw"
    packed = f";compress={s.compress}:{s.level}" if s.compress != "none" else ""
    return f"qcow2;cluster={s.cluster_size};compat={s.compat}{packed}"


def _clean_etag(etag: str | None) -> str:
    return (etag or "").strip().strip('"')


def _identity_matches(stored: dict[str, str], identity: dict[str, str]) -> bool:
    # An empty source version cannot prove two sources are the same (an HTTP server without ETag).
    if not identity.get("imgpipe-source-etag"):
        return False
    return all(stored.get(k) == v for k, v in identity.items())


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.budget = MemoryBudget(cfg.memory_limit - RUNTIME_RESERVE)
        self.concurrency = min(cfg.concurrency, cfg.slots())
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.log = log.get(worker=self.name)
        self.tasks: set[asyncio.Task[None]] = set()
        self.ready = False
        self.last_tick = time.monotonic()
        self.max_receives: int | None = None
        self.dlq_url: str | None = None
        self.metrics_port: int | None = None
        self.sqs: Any = None
        self.s3: S3Context | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def run(self) -> int:
        self.stopping = asyncio.Event()
        self.force = asyncio.Event()
        self._slot_freed = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.concurrency < self.cfg.concurrency:
            self.log.warning(
                "concurrency capped by memory_limit",
                concurrency=self.cfg.concurrency,
                capped=self.concurrency,
                memory_limit=self.cfg.memory_limit,
                job_memory=self.cfg.job_memory(),
            )
        async with contextlib.AsyncExitStack() as stack:
            config = AioConfig(
                connect_timeout=self.cfg.convert.connect_timeout,
                read_timeout=self.cfg.wait_time + 20,  # a long poll is not a stalled connection
                retries={"mode": "standard", "max_attempts": self.cfg.convert.retries + 1},
            )
            self.sqs = await stack.enter_async_context(get_session().create_client("sqs", config=config))
            self.s3 = S3Context(self.cfg.convert)
            stack.push_async_callback(self.s3.aclose)
            if self.cfg.metrics_port:
                site_runner = await self._serve_http()
                stack.push_async_callback(site_runner.cleanup)
            await self._read_queue_attributes()
            self.ready = True
            self.log.info(
                "worker started",
                queue=self.cfg.queue_url,
                concurrency=self.concurrency,
                memory_limit=self.cfg.memory_limit,
                metrics_port=self.metrics_port,
                dead_letter_queue=self.dlq_url,
                max_receives=self.max_receives,
            )
            await self._receive_loop()
            self.ready = False
            await self._drain()
        self.log.info("worker stopped")
        return 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            self.log.info(
                "signal: no new jobs; running jobs get the grace period",
                signal=sig.name,
                running=len(self.tasks),
                grace_period=self.cfg.grace_period,
            )
            self.stopping.set()
        else:
            self.log.info("second signal: aborting running jobs now", signal=sig.name)
            self.force.set()

    async def _read_queue_attributes(self) -> None:
        try:
            attrs = await self.sqs.get_queue_attributes(
                QueueUrl=self.cfg.queue_url, AttributeNames=["RedrivePolicy", "VisibilityTimeout"]
            )
        except (ClientError, BotoCoreError) as exc:
            raise UsageError(f"queue {self.cfg.queue_url}: cannot read its attributes: {exc}") from None
        a = attrs.get("Attributes", {})
        if int(a.get("VisibilityTimeout", self.cfg.visibility_timeout)) != self.cfg.visibility_timeout:
            self.log.warning(
                "queue VisibilityTimeout differs from visibility_timeout; the worker's value is used",
                queue_value=a.get("VisibilityTimeout"),
                visibility_timeout=self.cfg.visibility_timeout,
            )
        if "RedrivePolicy" in a:
            policy = json.loads(a["RedrivePolicy"])
            self.max_receives = int(policy["maxReceiveCount"])
            arn = policy["deadLetterTargetArn"].split(":")
            resp = await self.sqs.get_queue_url(QueueName=arn[5], QueueOwnerAWSAccountId=arn[4])
            self.dlq_url = str(resp["QueueUrl"])

    async def _receive_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.last_tick = time.monotonic()
            free = self.concurrency - len(self.tasks)
            if free <= 0:
                self._slot_freed.clear()
                await _first(self._slot_freed.wait(), self.stopping.wait())
                continue
            started = time.monotonic()
            recv = asyncio.ensure_future(self._receive(min(10, free)))
            await _first(recv, self.stopping.wait())
            if not recv.done():
                # Messages in a cancelled long poll reappear after their visibility timeout.
                recv.cancel()
                with contextlib.suppress(BaseException):
                    await recv
                break
            try:
                messages = recv.result()
            except (ClientError, BotoCoreError) as exc:
                failures += 1
                self.log.warning("receive failed", error=str(exc), failures=failures)
                await _first(asyncio.sleep(min(30.0, 0.5 * 2**failures)), self.stopping.wait())
                continue
            failures = 0
            self.metrics.receive_seconds.observe(time.monotonic() - started)
            if not messages:
                if self.cfg.once and not self.tasks:
                    self.log.info("queue empty for one long poll; --once exits")
                    break
                continue
            for msg in messages:
                task = asyncio.create_task(self._handle(msg))
                self.tasks.add(task)
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            self.log.error("message handler failed", error=repr(task.exception()))

    async def _receive(self, n: int) -> list[dict[str, Any]]:
        resp = await self.sqs.receive_message(
            QueueUrl=self.cfg.queue_url,
            MaxNumberOfMessages=n,
            WaitTimeSeconds=self.cfg.wait_time,
            VisibilityTimeout=self.cfg.visibility_timeout,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return list(resp.get("Messages", []))

    async def _drain(self) -> None:
        """Let running jobs finish; after a signal, within the grace period; then cancel them cleanly."""
        deadline: float | None = None
        while self.tasks and not self.force.is_set():
            if self.stopping.is_set() and deadline is None:
                deadline = time.monotonic() + self.cfg.grace_period
            if deadline is not None and time.monotonic() >= deadline:
                self.log.info("grace period over: aborting running jobs", running=len(self.tasks))
                break
            await asyncio.wait({*self.tasks}, timeout=0.2)
        for task in self.tasks:
            task.cancel()
        # Each cancelled handler aborts its upload and makes its message visible (time-boxed).
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- one message ----------------------------------------------------------------------------------
    async def _handle(self, msg: dict[str, Any]) -> None:
        mid = str(msg.get("MessageId", ""))
        receipt = str(msg["ReceiptHandle"])
        receives = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        structlog.contextvars.bind_contextvars(message_id=mid)
        heartbeat = asyncio.create_task(self._heartbeat(receipt))
        try:
            fate = await self._process(msg, mid, receives)
        except asyncio.CancelledError:
            heartbeat.cancel()
            await _acknowledge(lambda: self._change_visibility(receipt, 0), self.cfg.convert.cleanup_timeout)
            self.log.info("message released for another worker")
            raise
        finally:
            heartbeat.cancel()
        await _acknowledge(
            lambda: self._apply(fate, msg, receipt, receives), self.cfg.convert.cleanup_timeout
        )

    async def _heartbeat(self, receipt: str) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            try:
                await self._change_visibility(receipt, self.cfg.visibility_timeout)
            except (ClientError, BotoCoreError) as exc:
                self.log.warning("visibility heartbeat failed", error=str(exc))

    async def _change_visibility(self, receipt: str, seconds: int) -> None:
        await self.sqs.change_message_visibility(
            QueueUrl=self.cfg.queue_url, ReceiptHandle=receipt, VisibilityTimeout=seconds
        )

    async def _apply(self, fate: str, msg: dict[str, Any], receipt: str, receives: int) -> None:
        if fate == "retry":
            # Jitter so two workers that collided on one output do not collide again.
            base = min(self.cfg.retry_delay * 2 ** max(0, receives - 1), self.cfg.retry_delay_max)
            delay = min(round(base * random.uniform(1.0, 1.5)), self.cfg.retry_delay_max)
            await self._change_visibility(receipt, delay)
            self.log.info("message left for redelivery", delay=delay, receives=receives)
            return
        if fate == "dlq" and self.dlq_url:
            await self.sqs.send_message(QueueUrl=self.dlq_url, MessageBody=msg["Body"])
            self.log.info("message moved to the dead-letter queue", queue=self.dlq_url)
        await self.sqs.delete_message(QueueUrl=self.cfg.queue_url, ReceiptHandle=receipt)
        self.log.info("message deleted", fate=fate)

    async def _process(self, msg: dict[str, Any], mid: str, receives: int) -> str:
        try:
            jobs = parse_message(str(msg.get("Body", "")), mid, self.cfg.routes)
        except InvalidJob as exc:
            result = {"message_id": mid, "outcome": "invalid", "error": exc.one_line(), "exit_status": 2}
            self.metrics.jobs.labels("invalid").inc()
            await self._publish(result, None)
            return "dlq"
        if not jobs:
            self.metrics.jobs.labels("ignored").inc()
            self.log.info("no job in this message (an event no route matches, or not ObjectCreated)")
            return "delete"
        fates = set()
        for job in jobs:  # an S3 event may carry several records; done ones are found done on a retry
            fates.add(await self._run_job(job, mid, receives))
        return "retry" if "retry" in fates else "dlq" if "dlq" in fates else "delete"

    async def _run_job(self, job: Job, mid: str, receives: int) -> str:
        structlog.contextvars.bind_contextvars(job=job.job_id)
        result: dict[str, Any] = {
            "worker": self.name,
            "job_id": job.job_id,
            "message_id": mid,
            "source": job.source,
            "destination": job.destination,
            "receive_count": receives,
        }
        try:
            settings = job.settings(self.cfg.convert)
        except InvalidJob as exc:
            result.update(outcome="invalid", error=exc.one_line(), exit_status=2)
            self.metrics.jobs.labels("invalid").inc()
            await self._publish(result, job.results_queue)
            return "dlq"
        held = await self.budget.acquire(settings.memory_budget()["total"])
        self.metrics.memory_reserved.set(self.budget.used)
        self.metrics.in_flight.inc()
        started = time.monotonic()
        fate = "delete"
        try:
            outcome, details = await self._convert_once(job, settings)
            result.update(outcome=outcome, **details)
        except (InputRefused, UsageError) as exc:
            # Permanent: the image is refused, or the job cannot be done as written (e.g. a bad path).
            result.update(outcome="refused" if isinstance(exc, InputRefused) else "invalid")
            result.update(error=exc.one_line(), exit_status=exc.exit_status)
        except ImgpipeError as exc:
            fate = "retry"
            result.update(error=exc.one_line(), exit_status=exc.exit_status)
        except (ClientError, BotoCoreError, OSError) as exc:  # the worker's own S3 calls
            fate = "retry"
            result.update(error=f"{type(exc).__name__}: {exc}", exit_status=1)
        finally:
            self.budget.release(held)
            self.metrics.memory_reserved.set(self.budget.used)
            self.metrics.in_flight.dec()
            await _release_memory()
        seconds = round(time.monotonic() - started, 3)
        result["seconds"] = seconds
        self.metrics.job_seconds.observe(seconds)
        if fate == "retry":
            final = self.max_receives is not None and receives >= self.max_receives
            result["outcome"] = "failed" if final else "retrying"
            self.metrics.jobs.labels(result["outcome"]).inc()
            if final:  # the redrive policy moves it to the DLQ on its next receive
                await self._publish(result, job.results_queue)
            else:
                self.log.warning("job failed; will retry", **result)
            return fate
        self.metrics.jobs.labels(result["outcome"]).inc()
        await self._publish(result, job.results_queue)
        # A job that cannot be done as written is kept for inspection; a refused image is not.
        return "dlq" if result["outcome"] == "invalid" else fate

    async def _publish(self, result: dict[str, Any], queue: str | None) -> None:
        self.log.info("job result", **result)
        url = queue or self.cfg.results_queue_url
        if not url:
            return
        try:
            await self.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(result, sort_keys=True))
        except (ClientError, BotoCoreError) as exc:
            self.log.error("could not publish the result", queue=url, error=str(exc))

    # -- idempotent conversion ------------------------------------------------------------------------
    async def _convert_once(self, job: Job, settings: Settings) -> tuple[str, dict[str, Any]]:
        assert self.s3 is not None
        identity = await self._identity(job, settings)
        to_s3 = job.destination.startswith("s3://")
        commit: dict[str, str] = {}
        if to_s3:
            existing = await self._head(job.destination)
            if existing is not None and _identity_matches(existing.get("Metadata", {}), identity):
                return "duplicate", await self._existing_details(job.destination, existing)
            if self.cfg.abort_stale_uploads:
                await self._abort_stale_uploads(job.destination)
            commit = {"IfMatch": existing["ETag"]} if existing is not None else {"IfNoneMatch": "*"}

        hasher = hashlib.sha256()

        def on_open(source: Any, sink: Any) -> None:
            if source.etag:
                identity["imgpipe-source-etag"] = _clean_etag(source.etag)  # the version actually read
            if hasattr(sink, "create_args"):
                sink.create_args = {"Metadata": dict(identity)}
                sink.commit_args = dict(commit)
                loc = parse_s3_url(job.destination)
                sink.on_upload_created = lambda client, upload_id: self._claim(loc, client, upload_id)

        async def on_chunk(view: memoryview) -> None:
            if len(view) >= _THREAD_HASH_MIN:
                await asyncio.to_thread(hasher.update, view)
            else:
                hasher.update(view)

        def on_end() -> None:
            if job.source_sha256 and hasher.hexdigest() != job.source_sha256:
                raise ChecksumMismatch(
                    f"{job.source}: sha256 is {hasher.hexdigest()}, the job expects {job.source_sha256}"
                )

        hooks = JobHooks(on_open=on_open, on_chunk=on_chunk, on_end=on_end)
        try:
            summary = await convert(job.source, job.destination, settings, job_id=job.job_id, hooks=hooks)
        except ImgpipeError as exc:
            if to_s3 and not isinstance(exc, InputRefused):
                # Lost a race (our conditional commit failed, or our upload was aborted by a worker
                # starting the same job): the winner's output is as good as ours.
                existing = await self._head(job.destination)
                if existing is not None and _identity_matches(existing.get("Metadata", {}), identity):
                    self.log.info("another worker completed this output", error=exc.one_line())
                    return "duplicate", await self._existing_details(job.destination, existing)
            raise
        digest = hasher.hexdigest()
        # A package (OVA, tarball) writes one object per disk, kernel or ramdisk: each gets the tag.
        outputs = [str(o["destination"]) for o in summary.get("outputs", [])]
        if to_s3:
            for dest in outputs or [job.destination]:
                await self._tag(dest, digest)
        self.metrics.bytes_read.inc(int(summary["bytes_read"]))
        self.metrics.bytes_written.inc(int(summary["output_size"]))
        self.metrics.zero_bytes.inc(int(summary["zero_bytes_skipped"]))
        keep = ("source_format", "virtual_size", "bytes_read", "zero_bytes_skipped", "output_size")
        details = {k: summary[k] for k in keep}
        details["source_sha256"] = digest
        if outputs:
            details["outputs"] = summary["outputs"]
        return "done", details

    async def _identity(self, job: Job, settings: Settings) -> dict[str, str]:
        """What the output must carry to count as this job done: source, its version, options."""
        ident = {
            "imgpipe-schema": "1",
            "imgpipe-source": quote(job.source, safe=":/@+=,"),
            "imgpipe-options": options_fingerprint(settings),
        }
        if job.source_sha256:
            ident["imgpipe-expected-sha256"] = job.source_sha256
        if job.source.startswith(("s3://", "http://", "https://")):
            source = open_source(job.source, settings, self.s3)
            try:
                await source.open()
                etag = _clean_etag(source.etag)
            except ImgpipeError as exc:
                exc.stage = exc.stage or "source"
                raise
            finally:
                with contextlib.suppress(Exception):
                    await source.close()
        else:
            st = await asyncio.to_thread(os.stat, job.source)
            etag = f"{st.st_size}-{st.st_mtime_ns}"
        ident["imgpipe-source-etag"] = etag
        return ident

    async def _head(self, dst: str) -> dict[str, Any] | None:
        assert self.s3 is not None
        loc = parse_s3_url(dst)
        client = await self.s3.client()
        try:
            head: dict[str, Any] = await client.head_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            code, status = error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head

    async def _existing_details(self, dst: str, head: dict[str, Any]) -> dict[str, Any]:
        assert self.s3 is not None
        loc = parse_s3_url(dst)
        client = await self.s3.client()
        details: dict[str, Any] = {"output_size": int(head["ContentLength"])}
        # The worker that wrote the object tags it with the source's digest just after its commit: one
        # that lost the race to it may look in between, so it waits a little for the tag.
        for attempt in range(_TAG_WAIT_TRIES):
            with contextlib.suppress(ClientError, BotoCoreError):
                tags = await client.get_object_tagging(Bucket=loc.bucket, Key=loc.key)
                for tag in tags.get("TagSet", []):
                    if tag["Key"] == f"{_META_PREFIX}sha256":
                        details["source_sha256"] = tag["Value"]
                        return details
            if attempt + 1 < _TAG_WAIT_TRIES:
                await asyncio.sleep(0.25)
        return details

    async def _abort_stale_uploads(self, dst: str) -> None:
        """Uploads at this exact key before we start are another run's: a crashed or a racing one.

        Aborting a racing worker's upload only costs it a retry: it then finds our output done.
        """
        assert self.s3 is not None
        loc = parse_s3_url(dst)
        client = await self.s3.client()
        resp = await client.list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.key)
        for up in resp.get("Uploads", []):
            if up["Key"] != loc.key:
                continue
            with contextlib.suppress(ClientError):  # already completed or aborted by its owner
                await client.abort_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=up["UploadId"])
                self.log.info("aborted a stale multipart upload", upload_id=up["UploadId"])

    async def _claim(self, loc: S3Url, client: Any, upload_id: str) -> None:
        """Two workers that started one output at once: the later upload yields to the earlier.

        Uploads older than this job were aborted when it started, so another upload at the key is a
        live rival. ListMultipartUploads orders one key's uploads by initiation (AWS documents it;
        moto lists in creation order), and each worker lists after creating its own, so the first
        upload never yields and every later one sees it and does. The conditional commit already
        keeps a loser from overwriting; this saves its work and gives the same outcome on stores
        whose condition check is not atomic (moto's is not).
        """
        resp = await client.list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.key)
        first = next((u["UploadId"] for u in resp.get("Uploads", []) if u["Key"] == loc.key), upload_id)
        if first != upload_id:
            raise LostRace(f"{loc}: another worker is writing this output; retrying later")

    async def _tag(self, dst: str, digest: str) -> None:
        """The digest is known only at the end; metadata is fixed at upload start, so it is a tag."""
        assert self.s3 is not None
        loc = parse_s3_url(dst)
        client = await self.s3.client()
        try:
            await client.put_object_tagging(
                Bucket=loc.bucket,
                Key=loc.key,
                Tagging={"TagSet": [{"Key": f"{_META_PREFIX}sha256", "Value": digest}]},
            )
        except (ClientError, BotoCoreError) as exc:
            self.log.warning("could not tag the output with its digest", error=str(exc))

    # -- HTTP: /metrics, /healthz, /readyz ------------------------------------------------------------
    async def _serve_http(self) -> web.AppRunner:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        async def healthz(_: web.Request) -> web.Response:
            # Alive while the receive loop turns (a long poll plus slack) or jobs are draining.
            stale = time.monotonic() - self.last_tick > self.cfg.wait_time + 60
            if stale and not self.stopping.is_set() and len(self.tasks) < self.concurrency:
                return web.Response(status=503, text="receive loop stalled\n")
            return web.Response(text="ok\n")

        async def readyz(_: web.Request) -> web.Response:
            if self.ready and not self.stopping.is_set():
                return web.Response(text="ready\n")
            return web.Response(status=503, text="not ready\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.metrics_host, self.cfg.metrics_port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else self.cfg.metrics_port
        return runner


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc by name: find_library would spawn ldconfig
        libc.malloc_trim  # noqa: B018 - glibc only; AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


async def _release_memory() -> None:
    """After a job: free its cyclic garbage now and hand freed heap pages back to the OS.

    A long-lived worker otherwise keeps each job's peak (glibc keeps freed 2 MiB buffers in its arenas
    once its mmap threshold has grown), so RSS would follow the busiest moment, not the live budget.
    """
    gc.collect()
    if _libc is not None:
        await asyncio.to_thread(_libc.malloc_trim, 0)


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of these finishes; cancel the rest (futures passed in are left running)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t, a in zip(tasks, aws, strict=True):
            if t is not a and not t.done():
                t.cancel()


def run(cfg: WorkerConfig) -> int:
    return asyncio.run(Worker(cfg).run())


async def _acknowledge(what: Callable[[], Awaitable[None]], seconds: float) -> None:
    """Run an acknowledgement to the end even when cancelled, time-boxed; a failure is logged."""
    await time_boxed(
        what, seconds, "acknowledging the message failed", (ClientError, BotoCoreError, TimeoutError)
    )
