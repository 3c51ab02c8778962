"""Counters the stages update and the progress bar, logs and summary read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class JobStats:
    source: str = ""
    destination: str = ""
    source_size: int | None = None
    source_format: str = ""
    source_detail: str = ""
    source_wrappers: list[str] = field(default_factory=list)  # outermost first: ["zstd", "gzip"]
    output_format: str = ""
    cluster_size: int = 0
    bytes_read: int = 0
    zero_bytes_skipped: int = 0
    data_clusters: int = 0
    compression: str = "none"
    compressed_clusters: int = 0
    virtual_size: int = 0
    output_size: int = 0
    requests: int = 0
    bytes_fetched: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def read(self, n: int) -> None:
        self.bytes_read += n

    def summary(self) -> dict[str, object]:
        secs = self.seconds or (time.monotonic() - self.started)
        return {
            "source": self.source,
            "destination": self.destination,
            "source_format": self.source_format,
            "source_detail": self.source_detail,
            "source_wrappers": self.source_wrappers,
            "output_format": self.output_format,
            "cluster_size": self.cluster_size,
            "virtual_size": self.virtual_size,
            "bytes_read": self.bytes_read,
            "data_clusters": self.data_clusters,
            "compression": self.compression,
            "compressed_clusters": self.compressed_clusters,
            "zero_bytes_skipped": self.zero_bytes_skipped,
            "output_size": self.output_size,
            "source_requests": self.requests,
            "source_bytes_fetched": self.bytes_fetched,
            "seconds": round(secs, 3),
            "mb_per_s": round(self.bytes_read / secs / 1e6, 1) if secs > 0 else 0.0,
        }
