"""One validated settings object for a conversion job.

Every knob has a default, can be set from the environment as IMGPIPE_<NAME> (sizes accept K/M/G/T
suffixes, powers of 1024), and is overridden by a command-line flag. Validation happens once, here,
with messages that say which setting to change and to what.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

MIN_CLUSTER = 512
MAX_CLUSTER = 2 * MiB
S3_MIN_PART = 5 * MiB
S3_MAX_PART = 5 * GiB
S3_MAX_PARTS = 10_000

# algorithm: (lowest level, highest level, default = qemu's)
COMPRESSION_LEVELS = {"none": (0, 0, 0), "zlib": (1, 9, 6), "zstd": (1, 19, 3)}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str | int, what: str) -> int:
    """'64K', '8MiB', '2m', '4096' -> bytes. Powers of 1024, as qemu-img does."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{what}: cannot read {text!r} as a size; use bytes or a K/M/G/T suffix, e.g. 64K")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class Settings:
    # Output image.
    output_format: str = "qcow2"
    cluster_size: int = 64 * KiB
    compat: str = "1.1"
    # Compressed clusters: "none", "zlib" (deflate, as qemu-img -c) or "zstd" (compat 1.1 only).
    # Level None means qemu's own (zlib 6, zstd 3), so outputs match qemu-img's in size.
    compress: str = "none"
    compression_level: int | None = None
    compress_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Memory: chunk_size x buffers is the source side of the budget; see memory_budget().
    # 2 MiB chunks measured fastest here (1.4 s vs 2.5 s for 4 MiB on the 4 GiB bench image): the
    # working set stays in cache between the read, the zero test and the write.
    chunk_size: int = 2 * MiB
    buffers: int = 8
    queue_depth: int = 2
    # Sources.
    read_concurrency: int = 4
    retries: int = 5
    retry_backoff: float = 0.2
    connect_timeout: float = 20.0
    read_timeout: float = 60.0
    max_virtual_size: int = 16 * TiB
    # Sparse formats from a sequential source: bytes skipped over that are kept in case the image's
    # layout needs them later (tables or data a little out of order).
    reorder_buffer: int = 64 * MiB
    # gzip, xz, bzip2 and zstd inputs: beyond the first 64 MiB, decompressed bytes may not exceed this
    # many times the compressed bytes read so far (a decompression bomb is refused, exit 3).
    max_decompression_ratio: int = 2000
    # Packages (OVA, tarballs): convert only their Nth disk (1-based); None converts every disk.
    disk: int | None = None
    # S3 destination.
    part_size: int = 8 * MiB
    upload_concurrency: int = 4
    upload_memory: int = 48 * MiB
    endpoint_url: str | None = None
    cleanup_timeout: float = 30.0
    # Local destination.
    fsync: bool = False
    # Presentation.
    progress: bool | None = None  # None: on when stderr is a terminal
    json_summary: bool = False
    log_level: str = "info"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> Settings:
        if self.disk is not None and self.disk < 1:
            raise UsageError(f"--disk counts a package's disks from 1 (got {self.disk})")
        if self.output_format not in ("qcow2", "raw"):
            raise UsageError(f"--output-format must be qcow2 or raw, not {self.output_format!r}")
        if not (_is_pow2(self.cluster_size) and MIN_CLUSTER <= self.cluster_size <= MAX_CLUSTER):
            raise UsageError(
                f"--cluster-size must be a power of two from 512 to 2M (got {self.cluster_size}); "
                "the default is 64K"
            )
        if self.compat not in ("1.1", "0.10"):
            raise UsageError(f"--compat must be 1.1 (qcow2 v3) or 0.10 (qcow2 v2), not {self.compat!r}")
        self._validate_compression()
        if (
            self.chunk_size <= 0
            or self.chunk_size % self.cluster_size
            or self.chunk_size % MIN_CLUSTER
            or self.chunk_size > 256 * MiB
        ):
            raise UsageError(
                f"IMGPIPE_CHUNK_SIZE must be a multiple of the cluster size ({self.cluster_size}) up to 256M "
                f"(got {self.chunk_size}), so every chunk holds whole clusters"
            )
        if self.buffers < self.read_concurrency + 2:
            raise UsageError(
                f"IMGPIPE_BUFFERS ({self.buffers}) must be at least read concurrency + 2 "
                f"({self.read_concurrency + 2}) so ranged reads can run ahead of the stages"
            )
        for name in ("queue_depth", "read_concurrency", "upload_concurrency"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not S3_MIN_PART <= self.part_size <= S3_MAX_PART:
            raise UsageError(f"--part-size must be between 5M and 5G (S3's limits), got {self.part_size}")
        if self.upload_memory < self.part_size:
            raise UsageError(
                f"IMGPIPE_UPLOAD_MEMORY ({self.upload_memory}) must hold at least one part "
                f"(--part-size {self.part_size})"
            )
        if self.retries < 0 or self.retry_backoff < 0:
            raise UsageError("IMGPIPE_RETRIES and IMGPIPE_RETRY_BACKOFF must not be negative")
        if self.reorder_buffer < 0:
            raise UsageError("IMGPIPE_REORDER_BUFFER must not be negative")
        if self.max_decompression_ratio < 1:
            raise UsageError(
                f"IMGPIPE_MAX_DECOMPRESSION_RATIO must be at least 1 (got {self.max_decompression_ratio})"
            )
        if self.max_virtual_size <= 0:
            raise UsageError("IMGPIPE_MAX_VIRTUAL_SIZE must be positive")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UsageError(f"--log-level must be debug, info, warning or error, not {self.log_level!r}")
        return self

    def _validate_compression(self) -> None:
        if self.compress not in COMPRESSION_LEVELS:
            raise UsageError(f"--compress must be zlib, zstd or none, not {self.compress!r}")
        if self.compress == "none":
            return
        if self.output_format != "qcow2":
            raise UsageError("--compress needs qcow2 output; drop it or use --output-format qcow2")
        if self.compress == "zstd" and self.compat != "1.1":
            raise UsageError(
                "zstd compression needs qcow2 v3 (--compat 1.1); use --compress zlib for --compat 0.10"
            )
        lo, hi, _ = COMPRESSION_LEVELS[self.compress]
        if self.compression_level is not None and not lo <= self.compression_level <= hi:
            raise UsageError(
                f"--compression-level for {self.compress} must be {lo} to {hi} (got {self.compression_level})"
            )
        if not 1 <= self.compress_threads <= 256:
            raise UsageError(f"--compress-threads must be 1 to 256 (got {self.compress_threads})")

    @property
    def level(self) -> int:
        """The compression level in effect (the algorithm's qemu default when none was given)."""
        if self.compression_level is not None:
            return self.compression_level
        return COMPRESSION_LEVELS[self.compress][2]

    def memory_budget(self) -> dict[str, int]:
        """The sum the design promises: every term is a bound, not an estimate."""
        terms = {
            "chunk buffers (buffers x chunk_size)": self.buffers * self.chunk_size,
            "S3 part buffers in flight (upload_memory)": self.upload_memory,
            "S3 part 1, held until the header is known (part_size)": self.part_size,
            "qcow2 open L2 table + L1 (per TiB of virtual size at 64K clusters: 16 KiB)": 2
            * self.cluster_size,
        }
        terms["sparse image from a sequential source: reorder window (reorder_buffer)"] = self.reorder_buffer
        # A compressed input (gzip, xz, bzip2, zstd): each layer (at most 4) has its own small pool of
        # output chunks, and so does a sparse decoder after it. Add per layer: (queue_depth + 4) x
        # chunk_size, plus the decompressor's own state (zstd's window: 8 MiB at its level 19).
        if self.compress != "none":
            # Each compression thread holds one chunk's input and its compressed output, and refcounts
            # are kept per output cluster (2 bytes each: 32 KiB per GiB of output at 64K clusters).
            terms["compressed output of chunks in flight (2 x compress_threads x chunk_size)"] = (
                2 * self.compress_threads * self.chunk_size
            )
        terms["total"] = sum(terms.values())
        return terms

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validate()


_INT_FIELDS = {
    "cluster_size": True,
    "chunk_size": True,
    "buffers": False,
    "queue_depth": False,
    "read_concurrency": False,
    "retries": False,
    "max_virtual_size": True,
    "reorder_buffer": True,
    "max_decompression_ratio": False,
    "part_size": True,
    "upload_concurrency": False,
    "upload_memory": True,
    "compression_level": False,
    "compress_threads": False,
}
_FLOAT_FIELDS = ("retry_backoff", "connect_timeout", "read_timeout", "cleanup_timeout")
_STR_FIELDS = ("output_format", "compat", "compress", "endpoint_url", "log_level")


def from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Defaults <- IMGPIPE_* environment <- explicit overrides (flags); validated."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, is_size in _INT_FIELDS.items():
        raw = env.get(f"IMGPIPE_{name.upper()}")
        if raw is not None:
            key = f"IMGPIPE_{name.upper()}"
            if is_size:
                values[name] = parse_size(raw, key)
            else:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise UsageError(f"{key} must be a whole number, not {raw!r}") from None
    for name in _FLOAT_FIELDS:
        raw = env.get(f"IMGPIPE_{name.upper()}")
        if raw is not None:
            try:
                values[name] = float(raw)
            except ValueError:
                raise UsageError(f"IMGPIPE_{name.upper()} must be a number, not {raw!r}") from None
    for name in _STR_FIELDS:
        raw = env.get(f"IMGPIPE_{name.upper()}")
        if raw is not None:
            values[name] = raw
    if env.get("IMGPIPE_FSYNC") is not None:
        values["fsync"] = env["IMGPIPE_FSYNC"].lower() in ("1", "true", "yes", "on")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values).validate()
