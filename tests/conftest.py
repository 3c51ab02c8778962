from __future__ import annotations

import shutil

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("qemu-img") is None:
        raise pytest.UsageError("qemu-img is the test oracle: install qemu-utils (make test does it as root)")
