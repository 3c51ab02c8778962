"""Where the output goes: a local file (temporary name, renamed on success), stdout, or S3."""

from __future__ import annotations

import os
import stat

from pipeline.errors import UsageError
from pipeline.s3util import S3Context
from pipeline.settings import Settings
from pipeline.sinks.base import Sink


def open_sink(spec: str, settings: Settings, s3: S3Context, size_hint: int | None) -> Sink:
    seekable_needed = settings.output_format == "qcow2"
    if spec.startswith("s3://"):
        from pipeline.sinks.s3 import S3Sink

        return S3Sink(spec, settings, s3, size_hint)
    if spec.startswith(("http://", "https://")):
        raise UsageError(f"{spec}: HTTP is a source only; write to a local path, s3://BUCKET/KEY or -")
    from pipeline.sinks.file import FileSink, StreamSink

    if spec == "-":
        if seekable_needed:
            raise UsageError(
                "qcow2 cannot be written to a pipe (its header is written last, at offset 0); "
                "give a file or s3:// destination, or use --output-format raw for stdout"
            )
        return StreamSink("-", settings, fd=1)
    try:
        st = os.stat(spec)
    except FileNotFoundError:
        return FileSink(spec, settings)
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{spec}: is a directory; give the output file's full name")
    if stat.S_ISREG(st.st_mode):
        return FileSink(spec, settings)
    if seekable_needed:
        raise UsageError(
            f"{spec}: is not a regular file (a pipe or device) and qcow2 needs to seek back to its header; "
            "write to a regular file, or use --output-format raw"
        )
    return StreamSink(spec, settings)
