"""Job messages: the versioned JSON schema, S3 event notifications and the routing rules between them.

A job message (schema version 1; only `source` and `destination` are required):

    {
      "version": 1,                              # absent means 1; any other number is refused
      "source": "s3://uploads/vm1.img",          # the same URL forms as `imgpipe convert`
      "destination": "s3://images/vm1.qcow2",
      "id": "import-4711",                       # bound to every log line; default: the SQS message id
      "options": {"output_format": "qcow2", "cluster_size": "64K", "compat": "1.1",
                  "compress": "zstd", "compression_level": 3},
      "source_checksum": "sha256:<64 hex>",      # the job fails (permanently) if the source differs
      "results_queue": "https://sqs.../results"  # default: the worker's results_queue_url
    }

Unknown keys are refused rather than ignored: a misspelt "source_checksum" must not silently skip the
check. An S3 event notification (ObjectCreated:*, direct from S3 or wrapped in an SNS envelope) becomes
one job per record through the first routing rule whose bucket/prefix/suffix match the object.
"""

from __future__ import annotations

import json
import posixpath
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from pipeline.errors import ImgpipeError
from pipeline.settings import Settings, parse_size

SCHEMA_VERSION = 1
JOB_KEYS = frozenset(
    {"version", "source", "destination", "id", "options", "source_checksum", "results_queue"}
)
# Output options only: a job chooses what it gets, never how much memory the worker spends on it.
OPTION_KEYS = frozenset({"output_format", "cluster_size", "compat", "compress", "compression_level"})
TEMPLATE_FIELDS = frozenset({"bucket", "key", "name", "stem", "relative", "relative_stem"})
_SHA256_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


class InvalidJob(ImgpipeError):
    """The message can never become a valid job (bad JSON, schema, options): a permanent failure."""


class UnknownVersion(InvalidJob):
    """A schema version this worker does not know; a newer worker may (the message goes to the DLQ)."""


@dataclass(frozen=True, slots=True)
class Job:
    source: str
    destination: str
    job_id: str
    options: Mapping[str, Any] = field(default_factory=dict)
    source_sha256: str | None = None  # 64 lowercase hex digits
    results_queue: str | None = None

    def settings(self, base: Settings) -> Settings:
        """The worker's settings with this job's output options applied, validated."""
        try:
            return base.replace(**self.options)
        except ImgpipeError as exc:
            raise InvalidJob(f"job {self.job_id}: options: {exc.one_line()}") from None


@dataclass(frozen=True, slots=True)
class Route:
    """An S3 event routing rule: objects matching bucket/prefix/suffix go to `destination`."""

    bucket: str
    destination: str
    prefix: str = ""
    suffix: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix) and key.endswith(self.suffix)

    def render(self, bucket: str, key: str) -> str:
        name = posixpath.basename(key)
        relative = key[len(self.prefix) :]
        values = {
            "bucket": bucket,
            "key": key,
            "name": name,
            "stem": _stem(name),
            "relative": relative,
            "relative_stem": posixpath.join(posixpath.dirname(relative), _stem(posixpath.basename(relative))),
        }
        return self.destination.format_map(values)


def _stem(name: str) -> str:
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def check_template(template: str, where: str) -> None:
    """Refuse a destination template naming a field we do not fill (at start, not at the first event)."""
    if not template.startswith(("s3://", "/")):
        raise InvalidJob(f"{where}: destination {template!r} must be s3://BUCKET/KEY or an absolute path")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise InvalidJob(f"{where}: destination {template!r}: {exc}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise InvalidJob(
            f"{where}: destination {template!r} uses {sorted(unknown)}; "
            f"the fields are {{{'}, {'.join(sorted(TEMPLATE_FIELDS))}}}"
        )


def check_options(options: Any, where: str) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise InvalidJob(f"{where}: options must be an object")
    unknown = set(options) - OPTION_KEYS
    if unknown:
        raise InvalidJob(f"{where}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTION_KEYS)}")
    out = dict(options)
    if "cluster_size" in out:
        cs = out["cluster_size"]
        if not isinstance(cs, int | str) or isinstance(cs, bool):
            raise InvalidJob(f"{where}: cluster_size must be a number of bytes or a size like '64K'")
        try:
            out["cluster_size"] = parse_size(cs, "cluster_size")
        except ImgpipeError as exc:
            raise InvalidJob(f"{where}: {exc}") from None
    for name in ("output_format", "compat", "compress"):
        if name in out and not isinstance(out[name], str):
            raise InvalidJob(f"{where}: {name} must be a string")
    level = out.get("compression_level")
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)):
        raise InvalidJob(f"{where}: compression_level must be a whole number")
    return out


def _location(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidJob(f"{where}: {what} must be a non-empty string")
    if value == "-":
        raise InvalidJob(f"{where}: {what} cannot be '-' (standard input/output) in a queued job")
    return value


def parse_message(body: str, message_id: str, routes: Sequence[Route] = ()) -> list[Job]:
    """Turn one SQS message body into its jobs (none for an event no rule routes)."""
    try:
        doc = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise InvalidJob(f"message {message_id}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidJob(f"message {message_id}: a job is a JSON object, got {type(doc).__name__}")
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        # SNS envelope around an S3 event (raw message delivery off).
        return parse_message(doc["Message"], message_id, routes)
    if "Records" in doc or doc.get("Event") == "s3:TestEvent":
        return _event_jobs(doc, message_id, routes)
    return [parse_job(doc, message_id)]


def parse_job(doc: Mapping[str, Any], message_id: str) -> Job:
    where = f"job {doc.get('id') or message_id}"
    version = doc.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise UnknownVersion(f"{where}: schema version {version!r} is not known; this worker reads version 1")
    unknown = set(doc) - JOB_KEYS
    if unknown:
        raise InvalidJob(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(JOB_KEYS)}")
    source = _location(doc.get("source"), "source", where)
    destination = _location(doc.get("destination"), "destination", where)
    if destination.startswith(("http://", "https://")):
        raise InvalidJob(f"{where}: destination must be s3://BUCKET/KEY or a path, not HTTP")
    job_id = doc.get("id", message_id)
    if not isinstance(job_id, str) or not job_id:
        raise InvalidJob(f"{where}: id must be a non-empty string")
    checksum = doc.get("source_checksum")
    sha: str | None = None
    if checksum is not None:
        m = _SHA256_RE.match(checksum) if isinstance(checksum, str) else None
        if not m:
            raise InvalidJob(f"{where}: source_checksum must be 'sha256:' and 64 lowercase hex digits")
        sha = m.group(1)
    results = doc.get("results_queue")
    if results is not None and (not isinstance(results, str) or not results.startswith("http")):
        raise InvalidJob(f"{where}: results_queue must be an SQS queue URL")
    options = check_options(doc.get("options", {}), where)
    return Job(source, destination, job_id, options, sha, results)


def _event_jobs(doc: Mapping[str, Any], message_id: str, routes: Sequence[Route]) -> list[Job]:
    records = doc.get("Records") or []
    if not isinstance(records, list):
        raise InvalidJob(f"message {message_id}: Records must be a list")
    jobs: list[Job] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InvalidJob(f"message {message_id}: record {i} is not an object")
        if rec.get("eventSource") != "aws:s3" or not str(rec.get("eventName", "")).startswith(
            "ObjectCreated:"
        ):
            continue  # deletions, restores, ...: nothing to convert
        try:
            bucket = rec["s3"]["bucket"]["name"]
            key = unquote_plus(rec["s3"]["object"]["key"])  # S3 sends keys form-encoded
        except (KeyError, TypeError):
            raise InvalidJob(
                f"message {message_id}: record {i} has no s3.bucket.name / s3.object.key"
            ) from None
        route = next((r for r in routes if r.matches(bucket, key)), None)
        if route is None:
            continue
        etag = str(rec["s3"]["object"].get("eTag") or rec["s3"]["object"].get("sequencer") or "")
        job_id = f"s3://{bucket}/{key}" + (f"@{etag}" if etag else "")
        jobs.append(Job(f"s3://{bucket}/{key}", route.render(bucket, key), job_id, dict(route.options)))
    return jobs
