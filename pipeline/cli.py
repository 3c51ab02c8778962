"""Command line: `imgpipe convert SRC DST`, `imgpipe info SRC`, `imgpipe worker` (or `python -m pipeline`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from pipeline import __version__, log
from pipeline.errors import EXIT_USAGE, ImgpipeError, UsageError
from pipeline.malloc import limit_arenas
from pipeline.settings import Settings, from_env, parse_size

EPILOG = """\
exit status: 0 done, 1 failure (network, permissions, ...), 2 bad usage,
             3 input refused (corrupt, unsupported or unsafe image)

S3 credentials, region and endpoint come from the standard AWS environment and config files
(AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ...). Tuning knobs are also read
from IMGPIPE_<NAME> variables, e.g. IMGPIPE_CHUNK_SIZE=8M, IMGPIPE_READ_CONCURRENCY=8.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.exit(EXIT_USAGE, f"imgpipe: error: {message} (see imgpipe {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="imgpipe",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"imgpipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser(
        "convert",
        help="convert a disk image into qcow2 (or raw)",
        description="Convert SRC (path, -, http(s)://URL, s3://BUCKET/KEY) into DST (path, s3://BUCKET/KEY, "
        "or - for raw output on stdout) in one streaming pass.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("-O", "--output-format", choices=("qcow2", "raw"), default=None, help="default qcow2")
    c.add_argument("--cluster-size", metavar="SIZE", help="qcow2 cluster size, 512 to 2M (default 64K)")
    c.add_argument(
        "--compat", choices=("1.1", "0.10"), default=None, help="qcow2 v3 (1.1, default) or v2 (0.10)"
    )
    c.add_argument(
        "--compress",
        choices=("zlib", "zstd", "none"),
        default=None,
        help="store compressed clusters, as qemu-img convert -c (zstd needs --compat 1.1); default none",
    )
    c.add_argument(
        "--compression-level",
        type=int,
        metavar="N",
        help="zlib 1-9 (default 6), zstd 1-19 (default 3): qemu's defaults, for the same output size",
    )
    c.add_argument(
        "--compress-threads", type=int, metavar="N", help="compression threads (default: one per core)"
    )
    c.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    c.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="show a progress bar"
    )
    c.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    c.add_argument("--json", action="store_true", help="print the final summary as one JSON object on stdout")
    c.add_argument("--part-size", metavar="SIZE", help="S3 part size (default 8M; grows to fit 10,000 parts)")
    c.add_argument("--read-concurrency", type=int, metavar="N", help="concurrent ranged reads (default 4)")
    c.add_argument("--upload-concurrency", type=int, metavar="N", help="concurrent part uploads (default 4)")
    c.add_argument(
        "--fsync", action="store_true", default=None, help="fsync a local output before renaming it"
    )
    c.add_argument(
        "--disk",
        type=int,
        metavar="N",
        help="a package (OVA, tarball) with several disks: convert only its Nth (from 1); by default "
        "every disk is converted and DST must hold {disk} or {index}, or end in /",
    )
    c.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)
    c.add_argument("--job-id", help="bound to every log line of this job")
    i = sub.add_parser(
        "info",
        help="describe an image (format, sizes, safety verdict) without converting it",
        description="Sniff and check SRC as a conversion would, reading only its header and tables when "
        "the source serves byte ranges. Exit 3 if the image would be refused.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("src", metavar="SRC")
    i.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    i.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    i.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    w = sub.add_parser(
        "worker",
        help="convert jobs from an SQS queue (job messages and S3 event notifications)",
        description="Long-poll an SQS queue and convert each job it carries; see config/worker.toml for "
        "every setting (file < IMGPIPE_<KEY> environment < flags).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--queue-url", metavar="URL", help="SQS queue of jobs (or [worker] queue_url)")
    w.add_argument("--concurrency", type=int, metavar="N", help="jobs at once (default 4)")
    w.add_argument("--once", action="store_true", help="exit when the queue was empty for one long poll")
    w.add_argument("--config", metavar="FILE", help="worker settings file (TOML)")
    w.add_argument("--results-queue-url", metavar="URL", help="SQS queue for results")
    w.add_argument("--metrics-port", type=int, metavar="PORT", help="/metrics, /healthz, /readyz (0: off)")
    w.add_argument("--grace-period", type=float, metavar="SECONDS", help="on SIGTERM (default 45)")
    return p


def settings_from_args(ns: argparse.Namespace) -> Settings:
    return from_env(
        output_format=ns.output_format,
        cluster_size=parse_size(ns.cluster_size, "--cluster-size") if ns.cluster_size else None,
        compat=ns.compat,
        compress=ns.compress,
        compression_level=ns.compression_level,
        compress_threads=ns.compress_threads,
        endpoint_url=ns.endpoint_url,
        progress=ns.progress,
        json_summary=ns.json or None,
        part_size=parse_size(ns.part_size, "--part-size") if ns.part_size else None,
        read_concurrency=ns.read_concurrency,
        upload_concurrency=ns.upload_concurrency,
        fsync=ns.fsync,
        log_level=ns.log_level,
        disk=ns.disk,
    )


def _human(summary: dict[str, Any]) -> str:
    def mib(n: Any) -> str:
        return f"{int(n) / 2**20:,.1f} MiB"

    if "outputs" in summary:  # a package: one line per output
        lines = [
            f"{summary['package']} package: read {mib(summary['bytes_read'])}, "
            f"manifest {summary['manifest']}, {summary['seconds']} s"
        ]
        for o in summary["outputs"]:
            lines.append(
                f"  {o['kind']} {o['member']} ({o['source_format']}) -> {o['destination']}: "
                f"virtual size {mib(o['virtual_size'])}, output {mib(o['output_size'])}"
            )
        if summary.get("skipped_members"):
            lines.append(f"  skipped: {', '.join(summary['skipped_members'])}")
        return "\n".join(lines)

    packed = (
        f" ({summary['compressed_clusters']} compressed with {summary['compression']})"
        if summary.get("compression", "none") != "none"
        else ""
    )
    return (
        f"{summary['source_format']} -> {summary['output_format']}: "
        f"virtual size {mib(summary['virtual_size'])}, "
        f"read {mib(summary['bytes_read'])}, {summary['data_clusters']} data clusters written{packed}, "
        f"zeros skipped {mib(summary['zero_bytes_skipped'])}, output {mib(summary['output_size'])}, "
        f"{summary['seconds']} s, {summary['mb_per_s']} MB/s"
    )


def _worker(ns: argparse.Namespace) -> int:
    from pipeline import workerconfig

    try:
        cfg = workerconfig.load(
            ns.config,
            queue_url=ns.queue_url,
            concurrency=ns.concurrency,
            once=ns.once or None,
            results_queue_url=ns.results_queue_url,
            metrics_port=ns.metrics_port,
            grace_period=ns.grace_period,
        )
    except UsageError as exc:
        print(f"imgpipe: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_status
    log.configure(cfg.convert.log_level)
    from pipeline.worker import run

    try:
        return run(cfg)
    except ImgpipeError as exc:
        print(f"imgpipe: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_status


def _info(ns: argparse.Namespace) -> int:
    from pipeline.info import describe, human

    try:
        settings = from_env(endpoint_url=ns.endpoint_url, progress=False, log_level=ns.log_level)
    except UsageError as exc:
        print(f"imgpipe: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_status
    log.configure(settings.log_level)
    try:
        d = asyncio.run(describe(ns.src, settings))
    except ImgpipeError as exc:
        details = getattr(exc, "details", None)
        if details is not None:
            print(json.dumps(details, sort_keys=True) if ns.json else human(details))
        print(f"imgpipe: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_status
    print(json.dumps(d, sort_keys=True) if ns.json else human(d))
    return 0


def main(argv: list[str] | None = None) -> int:
    limit_arenas()  # before any thread allocates: see pipeline/malloc.py
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "worker":
        return _worker(ns)
    if ns.command == "info":
        return _info(ns)
    try:
        settings = settings_from_args(ns)
    except UsageError as exc:
        print(f"imgpipe: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_status
    log.configure(settings.log_level)
    from pipeline.runner import convert

    try:
        summary = asyncio.run(convert(ns.src, ns.dst, settings, job_id=ns.job_id))
    except ImgpipeError as exc:
        print(f"imgpipe: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("imgpipe: interrupted; output removed", file=sys.stderr)
        return 130
    if settings.json_summary:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(_human(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
