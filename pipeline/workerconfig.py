"""Worker settings: defaults <- config file (TOML) <- IMGPIPE_* environment <- command-line flags.

`config/worker.toml` documents every key with its default. Validation happens once, at start, with
messages that say what to change; an unknown key is an error (a typo must not fall back to a default).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ImgpipeError, UsageError
from pipeline.jobs import Route, check_options, check_template
from pipeline.settings import MiB, Settings, from_env, parse_size

# Interpreter, aiobotocore, aiohttp and the metrics server, before any job: measured ~85 MiB RSS on the
# 2-core dev machine; rounded up so the budget stays a bound.
RUNTIME_RESERVE = 128 * MiB


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    queue_url: str = ""
    results_queue_url: str = ""
    concurrency: int = 4
    memory_limit: int = 768 * MiB
    wait_time: int = 20
    visibility_timeout: int = 60
    heartbeat_interval: float = 20.0
    retry_delay: int = 30
    retry_delay_max: int = 900
    grace_period: float = 45.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9102
    abort_stale_uploads: bool = True
    once: bool = False
    routes: tuple[Route, ...] = ()
    convert: Settings = field(default_factory=Settings)

    def job_memory(self) -> int:
        """The bound one job at the default options may use (Settings.memory_budget)."""
        return self.convert.memory_budget()["total"]

    def validate(self) -> WorkerConfig:
        if not self.queue_url.startswith(("http://", "https://")):
            raise UsageError(
                "queue_url is required: give --queue-url, IMGPIPE_QUEUE_URL or [worker] queue_url "
                "(an SQS queue URL such as https://sqs.eu-west-1.amazonaws.com/123456789012/imgpipe-jobs)"
            )
        if self.results_queue_url and not self.results_queue_url.startswith(("http://", "https://")):
            raise UsageError(f"results_queue_url must be an SQS queue URL, not {self.results_queue_url!r}")
        if self.concurrency < 1:
            raise UsageError(f"concurrency must be at least 1 (got {self.concurrency})")
        need = RUNTIME_RESERVE + self.job_memory()
        if self.memory_limit < need:
            raise UsageError(
                f"memory_limit {self.memory_limit // MiB} MiB cannot hold one job: the runtime "
                f"({RUNTIME_RESERVE // MiB} MiB) plus one job's budget ({self.job_memory() // MiB} MiB); "
                f"raise memory_limit to at least {-(-need // MiB)}M or lower upload_memory / buffers"
            )
        if not 0 <= self.wait_time <= 20:
            raise UsageError(f"wait_time is SQS long polling, 0 to 20 seconds (got {self.wait_time})")
        if not 0 < self.visibility_timeout <= 43200:
            raise UsageError(f"visibility_timeout must be 1 to 43200 seconds (got {self.visibility_timeout})")
        if not 0 < self.heartbeat_interval <= self.visibility_timeout / 2:
            raise UsageError(
                f"heartbeat_interval ({self.heartbeat_interval} s) must be positive and at most half of "
                f"visibility_timeout ({self.visibility_timeout} s), so one late heartbeat cannot lose a job"
            )
        if not 0 <= self.retry_delay <= self.retry_delay_max <= 43200:
            raise UsageError(
                "retry_delay and retry_delay_max must satisfy 0 <= retry_delay <= retry_delay_max <= 43200 "
                f"(got {self.retry_delay} and {self.retry_delay_max})"
            )
        if self.grace_period < 0:
            raise UsageError(f"grace_period must not be negative (got {self.grace_period})")
        if not 0 <= self.metrics_port <= 65535:
            raise UsageError(f"metrics_port must be 0 (off) to 65535 (got {self.metrics_port})")
        return self

    def slots(self) -> int:
        """How many default-size jobs the memory limit holds (concurrency is capped by it)."""
        return max(1, (self.memory_limit - RUNTIME_RESERVE) // self.job_memory())


# Key -> type for [worker] and IMGPIPE_<KEY>; `once` is a flag only, routes are [[route]] tables.
_WORKER_TYPES: dict[str, type] = {
    "queue_url": str,
    "results_queue_url": str,
    "concurrency": int,
    "memory_limit": int,
    "wait_time": int,
    "visibility_timeout": int,
    "heartbeat_interval": float,
    "retry_delay": int,
    "retry_delay_max": int,
    "grace_period": float,
    "metrics_host": str,
    "metrics_port": int,
    "abort_stale_uploads": bool,
}
_SIZE_KEYS = frozenset({"memory_limit"})
# [convert] keys: the Settings fields a config file may set (the same as the IMGPIPE_* knobs).
_CONVERT_KEYS = frozenset(
    {
        "output_format",
        "cluster_size",
        "compat",
        "compress",
        "compression_level",
        "compress_threads",
        "chunk_size",
        "buffers",
        "queue_depth",
        "read_concurrency",
        "retries",
        "retry_backoff",
        "connect_timeout",
        "read_timeout",
        "max_virtual_size",
        "part_size",
        "upload_concurrency",
        "upload_memory",
        "endpoint_url",
        "cleanup_timeout",
        "log_level",
    }
)
_CONVERT_SIZES = frozenset({"cluster_size", "chunk_size", "max_virtual_size", "part_size", "upload_memory"})
_ROUTE_KEYS = frozenset({"bucket", "prefix", "suffix", "destination", "options"})


def _unknown(key: str, section: str, known: frozenset[str] | Mapping[str, Any], where: str) -> UsageError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UsageError(
        f"{where}: unknown key {key!r} in [{section}]; {hint}the keys are: {', '.join(sorted(known))}"
    )


def _coerce(name: str, value: Any, kind: type, where: str) -> Any:
    if name in _SIZE_KEYS or name in _CONVERT_SIZES:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UsageError(f"{where}: {name} must be a size such as 512M, not {value!r}")
        return parse_size(value, f"{where}: {name}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise UsageError(f"{where}: {name} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise UsageError(f"{where}: {name} must be a whole number, not {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {name} must be a whole number, not {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {name} must be a number, not {value!r}") from None
    if not isinstance(value, str):
        raise UsageError(f"{where}: {name} must be a string, not {value!r}")
    return value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file (give --config FILE or leave it out)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None, **flags: Any) -> WorkerConfig:
    """Build and validate the worker's config. `flags` are command-line values (None = not given)."""
    env = os.environ if env is None else env
    doc = _read_file(Path(path)) if path else {}
    where = str(path) if path else "config"
    for section in doc:
        if section not in ("worker", "convert", "route"):
            raise _unknown(section, "top level", frozenset({"worker", "convert", "route"}), where)
    values: dict[str, Any] = {}
    worker = doc.get("worker", {})
    for key, value in worker.items():
        if key not in _WORKER_TYPES:
            raise _unknown(key, "worker", _WORKER_TYPES, where)
        values[key] = _coerce(key, value, _WORKER_TYPES[key], f"{where} [worker]")
    for key, kind in _WORKER_TYPES.items():
        raw = env.get(f"IMGPIPE_{key.upper()}")
        if raw is not None:
            values[key] = _coerce(key, raw, kind, f"IMGPIPE_{key.upper()}")
    for key, value in flags.items():
        if value is not None:
            values[key] = value
    convert_file = doc.get("convert", {})
    convert: dict[str, Any] = {}
    for key, value in convert_file.items():
        if key not in _CONVERT_KEYS:
            raise _unknown(key, "convert", _CONVERT_KEYS, where)
        # The environment wins over the file: leave a key to from_env when its variable is set.
        if f"IMGPIPE_{key.upper()}" not in env:
            default = getattr(Settings(), key)
            kind = int if key == "compression_level" else str if default is None else type(default)
            convert[key] = _coerce(key, value, kind, f"{where} [convert]")
    routes = []
    raw_routes = doc.get("route", [])
    if not isinstance(raw_routes, list):
        raise UsageError(f"{where}: routes are [[route]] tables (an array), not [route]")
    for i, r in enumerate(raw_routes):
        rwhere = f"{where} [[route]] #{i + 1}"
        for key in r:
            if key not in _ROUTE_KEYS:
                raise _unknown(key, "route", _ROUTE_KEYS, rwhere)
        if not isinstance(r.get("bucket"), str) or not isinstance(r.get("destination"), str):
            raise UsageError(f"{rwhere}: bucket and destination are required strings")
        try:
            check_template(r["destination"], rwhere)
            options = check_options(r.get("options", {}), rwhere)
        except ImgpipeError as exc:
            raise UsageError(str(exc)) from None
        routes.append(Route(r["bucket"], r["destination"], r.get("prefix", ""), r.get("suffix", ""), options))
    try:
        settings = from_env(env, **convert, progress=False)
        for route in routes:
            settings.replace(**route.options)  # a route's options must make valid settings too
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return WorkerConfig(**values, routes=tuple(routes), convert=settings).validate()
