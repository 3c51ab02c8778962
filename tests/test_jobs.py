"""Job schema, S3 event routing and the worker's config file: rules checked without any server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.jobs import InvalidJob, Job, Route, UnknownVersion, parse_message
from pipeline.settings import MiB, Settings
from pipeline.workerconfig import RUNTIME_RESERVE, WorkerConfig, load

ROOT = Path(__file__).resolve().parent.parent
SHA = "ab" * 32


def test_smallest_job() -> None:
    [job] = parse_message('{"source": "s3://a/b.img", "destination": "s3://c/d.qcow2"}', "m-1")
    assert job == Job("s3://a/b.img", "s3://c/d.qcow2", "m-1")
    assert job.settings(Settings()) == Settings()


def test_full_job() -> None:
    body = {
        "version": 1,
        "source": "https://example.org/x.iso",
        "destination": "s3://c/x.qcow2",
        "id": "import-7",
        "options": {"cluster_size": "2M", "compat": "0.10", "output_format": "qcow2", "compress": "zlib"},
        "source_checksum": f"sha256:{SHA}",
        "results_queue": "http://127.0.0.1:5000/123/results",
    }
    [job] = parse_message(json.dumps(body), "m-1")
    assert job.job_id == "import-7"
    assert job.source_sha256 == SHA
    assert job.results_queue == body["results_queue"]
    s = job.settings(Settings())
    assert (s.cluster_size, s.compat, s.compress) == (2 * MiB, "0.10", "zlib")


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ("{not json", InvalidJob, "not JSON"),
        ("[1, 2]", InvalidJob, "JSON object"),
        ('{"version": 2, "source": "a", "destination": "b"}', UnknownVersion, "version 2"),
        ('{"version": true, "source": "a", "destination": "b"}', UnknownVersion, "version True"),
        ('{"source": "a"}', InvalidJob, "destination must be"),
        ('{"source": "a", "destination": "-"}', InvalidJob, "cannot be '-'"),
        ('{"source": "a", "destination": "http://x/y"}', InvalidJob, "not HTTP"),
        ('{"source": "a", "destination": "b", "sourse_checksum": "x"}', InvalidJob, "sourse_checksum"),
        ('{"source": "a", "destination": "b", "source_checksum": "md5:00"}', InvalidJob, "sha256"),
        ('{"source": "a", "destination": "b", "options": {"buffers": 99}}', InvalidJob, "buffers"),
        ('{"source": "a", "destination": "b", "options": {"cluster_size": "big"}}', InvalidJob, "size"),
        ('{"source": "a", "destination": "b", "options": {"compression_level": "9"}}', InvalidJob, "level"),
    ],
)
def test_invalid_jobs(body: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_message(body, "m-1")


def test_options_checked_against_settings() -> None:
    [job] = parse_message('{"source": "a", "destination": "b", "options": {"cluster_size": 1000}}', "m")
    with pytest.raises(InvalidJob, match="power of two"):
        job.settings(Settings())


def _event(bucket: str, key: str, name: str = "ObjectCreated:Put") -> dict[str, object]:
    return {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": name,
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1, "eTag": "e1"}},
            }
        ]
    }


ROUTES = (
    Route("uploads", "s3://images/{relative_stem}.qcow2", prefix="in/", suffix=".img"),
    Route("uploads", "s3://isos/{stem}.qcow2", suffix=".iso", options={"cluster_size": 2 * MiB}),
)


def test_event_routed_direct_and_via_sns() -> None:
    direct = json.dumps(_event("uploads", "in/team+a/vm%2B1.img"))
    [job] = parse_message(direct, "m", ROUTES)
    # S3 form-encodes keys: '+' is a space, %2B a plus.
    assert job.source == "s3://uploads/in/team a/vm+1.img"
    assert job.destination == "s3://images/team a/vm+1.qcow2"
    assert job.job_id == "s3://uploads/in/team a/vm+1.img@e1"
    sns = json.dumps({"Type": "Notification", "Message": json.dumps(_event("uploads", "x/y.iso"))})
    [job] = parse_message(sns, "m", ROUTES)
    assert (job.destination, dict(job.options)) == ("s3://isos/y.qcow2", {"cluster_size": 2 * MiB})


def test_events_without_route_or_not_created_make_no_job() -> None:
    assert parse_message(json.dumps(_event("other", "in/a.img")), "m", ROUTES) == []
    assert parse_message(json.dumps(_event("uploads", "in/a.txt")), "m", ROUTES) == []
    assert parse_message(json.dumps(_event("uploads", "in/a.img", "ObjectRemoved:Delete")), "m", ROUTES) == []
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "uploads"}
    assert parse_message(json.dumps(test_event), "m", ROUTES) == []


# -- config ---------------------------------------------------------------------------------------------

Q = "http://127.0.0.1:5000/123456789012/jobs"


def test_documented_config_is_the_defaults() -> None:
    """config/worker.toml shows every key with its default: loading it changes nothing."""
    from_file = load(ROOT / "config" / "worker.toml", env={}, queue_url=Q)
    assert from_file == load(None, env={}, queue_url=Q)
    assert from_file == WorkerConfig(queue_url=Q, convert=Settings(progress=False)).validate()
    text = (ROOT / "config" / "worker.toml").read_text()
    for key in WorkerConfig.__dataclass_fields__:
        if key not in ("once", "routes", "convert"):
            assert f"\n{key} = " in text, f"{key} is not documented in config/worker.toml"


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        '[worker]\nqueue_url = "http://q/1/a"\nconcurrency = 2\ngrace_period = 5\n'
        '[convert]\ncluster_size = "128K"\nupload_memory = "32M"\n'
    )
    c = load(cfg, env={})
    assert (c.queue_url, c.concurrency, c.grace_period) == ("http://q/1/a", 2, 5.0)
    assert (c.convert.cluster_size, c.convert.upload_memory) == (128 * 1024, 32 * MiB)
    c = load(cfg, env={"IMGPIPE_CONCURRENCY": "3", "IMGPIPE_CLUSTER_SIZE": "256K"})
    assert (c.concurrency, c.convert.cluster_size) == (3, 256 * 1024)
    c = load(cfg, env={"IMGPIPE_CONCURRENCY": "3"}, concurrency=1)
    assert c.concurrency == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "[worker]\nconcurency = 2\n",
            "unknown key 'concurency' in \\[worker\\]; did you mean 'concurrency'",
        ),
        ("[convert]\nchunksize = 2\n", "did you mean 'chunk_size'"),
        ("[workers]\n", "unknown key 'workers'"),
        ("[worker]\nconcurrency = 'x'\n", "concurrency must be a whole number"),
        ("[worker]\nheartbeat_interval = 40\n", "at most half of visibility_timeout"),
        ("[worker]\nmemory_limit = '100M'\n", "raise memory_limit to at least"),
        ("[worker]\nwait_time = 30\n", "0 to 20 seconds"),
        ("[convert]\nbuffers = 2\n", "IMGPIPE_BUFFERS"),
        ('[convert]\ncompress = "lz4"\n', "zlib, zstd or none"),
        ('[[route]]\nbucket = "b"\ndestination = "s3://x/{nme}"\n', "uses \\['nme'\\]"),
        ('[[route]]\nbucket = "b"\ndestination = "s3://x/{name}"\nsufix = ".img"\n', "'suffix'"),
        ('[[route]]\nbucket = "b"\ndestination = "s3://x/{name}"\noptions = {cluster_size = 3}\n', "power"),
        ("[worker\n", "not valid TOML"),
    ],
)
def test_config_errors_say_what_to_change(tmp_path: Path, text: str, match: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=match):
        load(cfg, env={}, queue_url=Q)


def test_queue_url_required_and_memory_caps_slots() -> None:
    with pytest.raises(UsageError, match="queue_url is required"):
        load(None, env={})
    c = load(None, env={"IMGPIPE_QUEUE_URL": Q, "IMGPIPE_MEMORY_LIMIT": "420M"})
    assert c.slots() == (420 * MiB - RUNTIME_RESERVE) // c.job_memory() == 2


async def test_memory_budget_makes_a_job_wait_rather_than_exceed() -> None:
    import asyncio

    from pipeline.worker import MemoryBudget

    budget = MemoryBudget(100)
    first = await budget.acquire(60)
    second = asyncio.create_task(budget.acquire(60))
    await asyncio.sleep(0.05)
    assert not second.done()  # 60 + 60 > 100: waits
    assert budget.used == 60
    budget.release(first)
    assert await asyncio.wait_for(second, 1) == 60
    assert budget.used == 60
    # A job larger than the whole budget runs alone instead of never.
    huge = asyncio.create_task(budget.acquire(500))
    await asyncio.sleep(0.05)
    assert not huge.done()
    budget.release(60)
    assert await asyncio.wait_for(huge, 1) == 100
