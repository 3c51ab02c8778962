"""Where image bytes come from: local files and stdin, HTTP(S) URLs, S3 objects."""

from __future__ import annotations

from pipeline.s3util import S3Context
from pipeline.settings import Settings
from pipeline.sources.base import Source


def open_source(spec: str, settings: Settings, s3: S3Context | None = None) -> Source:
    """Pick the source for a SRC argument: '-', a path, http(s)://..., s3://bucket/key."""
    if spec.startswith(("http://", "https://")):
        from pipeline.sources.http import HttpSource

        return HttpSource(spec, settings)
    if spec.startswith("s3://"):
        from pipeline.sources.s3 import S3Source

        return S3Source(spec, settings, s3)
    from pipeline.sources.file import FileSource

    return FileSource(spec, settings)
