"""Start-up cost: a job imports what its source, format and destination need, and nothing else.

Every module a local raw -> qcow2 job loads is paid for in its wall time (a 1 MiB conversion is
almost all interpreter start and imports); decoders, packages and the network stack load on first use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.formats.layout import Decoder
from pipeline.formats.registry import DECODERS, decoder_class
from tests.helpers import ROOT, MiB

# Loaded only by the jobs that use them.
NOT_FOR_A_LOCAL_RAW_JOB = (
    "pipeline.formats.qcow2",
    "pipeline.formats.vhd",
    "pipeline.formats.vhdx",
    "pipeline.formats.vmdk",
    "pipeline.formats.vdi",
    "pipeline.formats.layout",
    "pipeline.formats.readers",
    "pipeline.formats.decode",
    "pipeline.package.run",
    "pipeline.package.ovf",
    "pipeline.package.tar",
    "xml.etree.ElementTree",
    "defusedxml",
    "pipeline.sources.http",
    "pipeline.sources.s3",
    "pipeline.sinks.s3",
    "pipeline.sources.rangeio",
    "yarl",
    "zstandard",
    "isal",
    "zlib_ng",
    "aiohttp",
    "botocore",
    "aiobotocore",
    "tqdm",
)

_PROBE = """
import json, sys
from pipeline.cli import main
status = main(["convert", "--no-progress", sys.argv[1], sys.argv[2]])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("fmt", sorted(DECODERS))
def test_registry_names_each_decoder(fmt: str) -> None:
    cls = decoder_class(fmt)
    assert issubclass(cls, Decoder)
    assert cls.format == fmt


def test_local_raw_job_imports_only_what_it_uses(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(b"\x01" * MiB)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(src), str(tmp_path / "out.img")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["status"] == 0, proc.stderr[-2000:]
    loaded = set(out["modules"])
    assert "pipeline.runner" in loaded
    assert sorted(loaded.intersection(NOT_FOR_A_LOCAL_RAW_JOB)) == []
