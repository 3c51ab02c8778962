"""`make run`: build a sample disk image locally and convert it, with the progress bar.

No cloud account, no network: the sample is a 1 GiB raw disk with about 30 % data in scattered
extents (what a freshly installed VM disk looks like to a converter), written to ./build/.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from pipeline.cli import main as cli_main

MiB = 1024 * 1024


def build_sample(path: Path, size: int = 1024 * MiB, seed: int = 2026) -> None:
    rng = random.Random(seed)
    block = os.urandom(4 * MiB)
    with path.open("wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            # Runs of data (1-8 MiB) and zeros (2-16 MiB), roughly 30 % data.
            n = min(rng.randint(1, 8) * MiB // 2, size - pos)
            f.seek(pos)
            f.write((block * 4)[rng.randrange(0, 4 * MiB) :][:n])
            pos += n + rng.randint(2, 16) * MiB // 2


def main() -> int:
    out = Path("build")
    out.mkdir(exist_ok=True)
    sample, dst = out / "sample.raw", out / "sample.qcow2"
    if not sample.exists():
        print(f"building {sample} (1 GiB raw disk, ~30 % data) ...", file=sys.stderr)
        build_sample(sample)
    print(f"imgpipe convert {sample} {dst} --progress", file=sys.stderr)
    status = cli_main(["convert", str(sample), str(dst), "--progress"])
    if status == 0:
        print(
            f"done: {dst} (check it with: qemu-img check {dst}; qemu-img compare {sample} {dst})",
            file=sys.stderr,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
