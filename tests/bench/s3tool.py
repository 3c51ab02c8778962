"""A plain S3 copy, run as its own process so the benchmark can measure it: the `aws s3 cp` of the peer rows.

    s3tool.py upload FILE s3://bucket/key [--part-size BYTES] [--concurrency N]
    s3tool.py download s3://bucket/key FILE [--part-size BYTES] [--concurrency N]

It is boto3's transfer manager (s3transfer, what aws-cli uses) with fixed-size parts and N threads;
endpoint and credentials come from the standard AWS_* environment variables. Request checksums follow the
same default as imgpipe's against a custom endpoint (when_required, unless AWS_REQUEST_CHECKSUM_CALCULATION
says otherwise), so both sides do the same per-byte work besides the copy itself.
Prints one JSON line: bytes, seconds, MiB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def split_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://") or "/" not in url[5:]:
        raise SystemExit(f"not an s3://bucket/key URL: {url}")
    bucket, key = url[5:].split("/", 1)
    return bucket, key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="s3tool.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("op", choices=["upload", "download"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--part-size", type=int, default=8 * 2**20)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    config = TransferConfig(
        multipart_threshold=args.part_size,
        multipart_chunksize=args.part_size,
        max_concurrency=args.concurrency,
        use_threads=True,
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    checksums = {}
    if endpoint and not os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"):
        checksums["request_checksum_calculation"] = "when_required"
    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(**checksums))
    t0 = time.perf_counter()
    if args.op == "upload":
        bucket, key = split_url(args.dst)
        size = os.path.getsize(args.src)
        s3.upload_file(args.src, bucket, key, Config=config)
    else:
        bucket, key = split_url(args.src)
        s3.download_file(bucket, key, args.dst, Config=config)
        size = os.path.getsize(args.dst)
    secs = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "op": args.op,
                "output_size": size,
                "seconds": round(secs, 3),
                "mib_per_s": round(size / 2**20 / secs, 1) if secs else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
