"""Soak row: 200 small jobs through 2 `imgpipe worker` processes on moto (S3 + SQS) on loopback.

    .venv/bin/python tests/bench/bench.py --rows soak      (or: .venv/bin/python tests/bench/soak.py)

Reports jobs per second, p50/p95 job latency (receive to result, from each job's `seconds`, and
end to end from sending the message to reading its result), failures (target 0) and each worker's RSS
after 200 jobs against its RSS after the first 20 (target: within 10 %, i.e. no leak). RSS is read
from /proc/PID/status with the workers idle, after all jobs of a phase have published their results.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests"))

from servers import MotoServer  # noqa: E402

MIB = 1024 * 1024
JOBS = 200
WARM = 20
WORKERS = 2


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _image(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    buf = bytearray(size)
    for _ in range(size // 65536 // 3):  # about a third of the clusters hold data
        off = rng.randrange(0, size - 4096)
        buf[off : off + 4096] = rng.randbytes(4096)
    path.write_bytes(buf)
    return path


def run(log: Any = print, jobs: int = JOBS, warm: int = WARM) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imgpipe-soak-") as tmpdir, MotoServer() as moto:
        tmp = Path(tmpdir)
        kw: dict[str, Any] = {
            "endpoint_url": moto.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        s3, sqs = boto3.client("s3", **kw), boto3.client("sqs", **kw)
        s3.create_bucket(Bucket="soak-src")
        s3.create_bucket(Bucket="soak-dst")
        queue = sqs.create_queue(QueueName="soak-jobs")["QueueUrl"]
        results = sqs.create_queue(QueueName="soak-results")["QueueUrl"]
        sizes = [MIB, 2 * MIB, 4 * MIB, 8 * MIB + 65536]  # the last one is a two-part multipart upload
        for i, size in enumerate(sizes):
            s3.upload_file(str(_image(tmp / f"s{i}.raw", size, i)), "soak-src", f"s{i}.raw")
        env = moto.env(os.environ)
        env = {k: v for k, v in env.items() if not k.startswith("IMGPIPE_")}
        env.update(IMGPIPE_WAIT_TIME="1", IMGPIPE_METRICS_PORT="0", IMGPIPE_LOG_LEVEL="warning")
        logs = [(tmp / f"worker{i}.log").open("wb") for i in range(WORKERS)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "worker",
                    "--queue-url",
                    queue,
                    "--results-queue-url",
                    results,
                ],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
            for f in logs
        ]
        sent: dict[str, float] = {}
        got: dict[str, dict[str, Any]] = {}
        end_to_end: list[float] = []

        def send(first: int, last: int) -> None:
            for start in range(first, last, 10):
                entries = []
                for i in range(start, min(start + 10, last)):
                    body = {
                        "id": f"j{i}",
                        "source": f"s3://soak-src/s{i % len(sizes)}.raw",
                        "destination": f"s3://soak-dst/o{i}.qcow2",
                    }
                    entries.append({"Id": str(i), "MessageBody": json.dumps(body)})
                    sent[f"j{i}"] = time.monotonic()
                sqs.send_message_batch(QueueUrl=queue, Entries=entries)

        def collect(count: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while len(got) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"soak: {len(got)} of {count} results after {timeout} s")
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"soak: a worker exited with {p.returncode}")
                resp = sqs.receive_message(QueueUrl=results, MaxNumberOfMessages=10, WaitTimeSeconds=1)
                now = time.monotonic()
                for m in resp.get("Messages", []):
                    r = json.loads(m["Body"])
                    got[r["job_id"]] = r
                    end_to_end.append(now - sent[r["job_id"]])
                    sqs.delete_message(QueueUrl=results, ReceiptHandle=m["ReceiptHandle"])

        try:
            t0 = time.monotonic()
            send(0, warm)
            collect(warm, 300)
            rss_warm = [_rss(p.pid) for p in procs]
            log(f"soak: {warm} jobs done; worker RSS {[r // MIB for r in rss_warm]} MiB")
            t1 = time.monotonic()
            # Half-way sample: a leak grows linearly; a warm-up of caches and allocator flattens out.
            send(warm, jobs // 2)
            collect(jobs // 2, 900)
            rss_half = [_rss(p.pid) for p in procs]
            send(jobs // 2, jobs)
            collect(jobs, 900)
            t2 = time.monotonic()
            rss_end = [_rss(p.pid) for p in procs]
            log(f"soak: {jobs} jobs done; worker RSS {[r // MIB for r in rss_end]} MiB")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            for f in logs:
                f.close()
        exits = [p.returncode for p in procs]
        outcomes = [r["outcome"] for r in got.values()]
        seconds = sorted(r["seconds"] for r in got.values())
        e2e = sorted(end_to_end)
        per_worker: dict[str, int] = {}
        for r in got.values():
            per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        growth = [(b - a) / a for a, b in zip(rss_warm, rss_end, strict=True)]
        leftover = s3.list_multipart_uploads(Bucket="soak-dst").get("Uploads", [])
        outputs = s3.list_objects_v2(Bucket="soak-dst", MaxKeys=1000).get("KeyCount", 0)
        return {
            "jobs": jobs,
            "workers": WORKERS,
            "failures": sum(o != "done" for o in outcomes) + (jobs - len(got)),
            "outputs": outputs,
            "multipart_uploads_left": len(leftover),
            "jobs_per_second": round((jobs - warm) / (t2 - t1), 2),
            "total_seconds": round(t2 - t0, 1),
            "job_seconds_p50": round(statistics.median(seconds), 3),
            "job_seconds_p95": round(pct(seconds, 0.95), 3),
            "end_to_end_p50": round(statistics.median(e2e), 3),
            "end_to_end_p95": round(pct(e2e, 0.95), 3),
            "rss_after_warm_mib": [round(r / MIB, 1) for r in rss_warm],
            "rss_after_half_mib": [round(r / MIB, 1) for r in rss_half],
            "rss_after_all_mib": [round(r / MIB, 1) for r in rss_end],
            "rss_growth_pct": [round(g * 100, 1) for g in growth],
            "jobs_per_worker": sorted(per_worker.values()),
            "worker_exit_status": exits,
            "ok": (
                all(o == "done" for o in outcomes)
                and len(got) == jobs
                and outputs == jobs
                and not leftover
                and all(abs(g) <= 0.10 for g in growth)
                and exits == [0] * WORKERS
            ),
        }


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else JOBS
    out = run(lambda m: print(m, file=sys.stderr), jobs=n)
    print(json.dumps(out, indent=2))
    sys.exit(0 if out["ok"] else 1)
