"""Build (once) and cache the benchmark's source images.

- img4g.raw: a 4 GiB ext4 filesystem made with `mke2fs -t ext4 -d` from real files (subtrees of /usr, about
  1.0 GB) plus about 256 MB of random (incompressible) files, then written out FULLY ALLOCATED (no holes:
  `cp --sparse=never`), so a reader that trusts holes gains nothing; 25-35 % of its 64 KiB clusters hold data.
- img1g.raw: a 1 GiB ext4 filesystem with the random files and a little of /usr, fully allocated.
- img16g.raw: the 4 GiB filesystem's bytes at the start of a 16 GiB raw disk. It stays SPARSE on disk (only
  the data is stored): it is only ever served over HTTP, where holes arrive as zeros like any other byte.
The recipe is versioned in meta.json; a cached set with the same recipe version is reused as is.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RECIPE = 1
GIB = 2**30
MIB = 2**20
CLUSTER = 64 * 1024
ZERO_CLUSTER = bytes(CLUSTER)

# Candidate /usr subtrees, taken in this order while they fit the budget (sizes vary by machine).
USR_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/bin",
    "/usr/share/man",
    "/usr/share/doc",
    "/usr/share/locale",
    "/usr/include",
    "/usr/lib/python3",
    "/usr/lib/gcc",
    "/usr/share/i18n",
    "/usr/share/perl",
    "/usr/sbin",
    "/usr/libexec",
    "/usr/share",
    "/usr/lib",
]

Log = Callable[[str], None]


@dataclass
class ImageInfo:
    name: str
    path: str
    virtual_size: int
    allocated_bytes: int
    data_clusters: int  # non-zero 64 KiB clusters
    data_fraction: float
    fully_allocated: bool


@dataclass
class ImageSet:
    recipe: int
    images: dict[str, ImageInfo]
    tree_bytes: int
    random_bytes: int
    subtrees: list[str]
    build_seconds: float

    def path(self, name: str) -> Path:
        return Path(self.images[name].path)


def run(argv: list[str], log: Log) -> None:
    log("  $ " + " ".join(argv))
    subprocess.run(argv, check=True)


def tree_size(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=False).stdout
    try:
        return int(out.split()[0])
    except (IndexError, ValueError):
        return 0


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def scan_data(path: Path) -> int:
    """Count the 64 KiB clusters of the file that are not all zero (holes read as zeros)."""
    n = 0
    buf = bytearray(16 * MIB)
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            view = buf if got == len(buf) else buf[:got]
            for off in range(0, got, CLUSTER):
                if not view.startswith(ZERO_CLUSTER, off) and (got - off >= CLUSTER or any(view[off:])):
                    n += 1
    return n


def pick_subtrees(budget: int, log: Log) -> list[tuple[str, int]]:
    chosen: list[tuple[str, int]] = []
    total = 0
    for cand in USR_CANDIDATES:
        if total >= budget * 0.9:
            break
        if not os.path.isdir(cand) or any(
            cand.startswith(c + "/") or c.startswith(cand + "/") for c, _ in chosen
        ):
            continue
        size = tree_size(cand)
        if size == 0 or total + size > budget * 1.15:
            continue
        chosen.append((cand, size))
        total += size
    log(
        f"  /usr subtrees: {', '.join(f'{c} ({s / MIB:.0f} MiB)' for c, s in chosen)} = {total / MIB:.0f} MiB"
    )
    return chosen


def copy_tree(src: str, dst: Path) -> None:
    """Hard-link the tree when on the same filesystem (no data written), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    same_fs = os.stat(src).st_dev == os.stat(dst.parent).st_dev
    argv = ["cp", "-a", "-l" if same_fs else "--reflink=auto", src, str(dst)]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0 and not dst.exists():
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()[:500]}")


def write_random_files(dst: Path, total: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    dst.mkdir(parents=True, exist_ok=True)
    written = 0
    i = 0
    while written < total:
        size = min(total - written, rng.choice([1, 2, 4, 8, 16, 32]) * MIB + rng.randrange(0, MIB))
        with open(dst / f"blob{i:04d}.bin", "wb") as f:
            left = size
            while left:
                step = min(left, 4 * MIB)
                f.write(os.urandom(step))
                left -= step
        written += size
        i += 1
    return written


def make_fs(staging: Path, out: Path, size: int, log: Log) -> None:
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "benchroot", "-d", str(staging), str(out)], log)


def fully_allocate(sparse: Path, out: Path, log: Log) -> None:
    tmp = out.with_suffix(".tmp")
    run(["cp", "--sparse=never", str(sparse), str(tmp)], log)
    size = tmp.stat().st_size
    if allocated(tmp) < size:
        # cp on some filesystems may still punch holes: fill them by writing zeros over the whole file
        log(f"  {tmp.name}: cp left holes ({allocated(tmp)} < {size}); filling them")
        fill_holes(tmp)
    tmp.rename(out)


def fill_holes(path: Path) -> None:
    seek_hole = getattr(os, "SEEK_HOLE", 4)
    seek_data = getattr(os, "SEEK_DATA", 3)
    with open(path, "r+b", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            hole = os.lseek(fd, pos, seek_hole)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, seek_data)
            except OSError:
                data = size
            _zero_range(fd, hole, data)
            pos = data


def _zero_range(fd: int, start: int, end: int) -> None:
    chunk = bytes(8 * MIB)
    while start < end:
        n = min(len(chunk), end - start)
        os.pwrite(fd, chunk[:n], start)
        start += n


def describe(name: str, path: Path, data_clusters: int | None = None) -> ImageInfo:
    st = path.stat()
    clusters = scan_data(path) if data_clusters is None else data_clusters
    return ImageInfo(
        name=name,
        path=str(path),
        virtual_size=st.st_size,
        allocated_bytes=st.st_blocks * 512,
        data_clusters=clusters,
        data_fraction=clusters * CLUSTER / st.st_size,
        fully_allocated=st.st_blocks * 512 >= st.st_size,
    )


def load_cached(imgdir: Path) -> ImageSet | None:
    meta = imgdir / "meta.json"
    try:
        raw = json.loads(meta.read_text())
        if raw.get("recipe") != RECIPE:
            return None
        images = {k: ImageInfo(**v) for k, v in raw["images"].items()}
        for info in images.values():
            p = Path(info.path)
            if not p.exists() or p.stat().st_size != info.virtual_size:
                return None
        raw["images"] = images
        return ImageSet(**raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_images(
    workdir: Path, log: Log, tree_budget: int = 1000 * 10**6, random_bytes: int = 256 * MIB
) -> ImageSet:
    imgdir = workdir / "images"
    cached = load_cached(imgdir)
    if cached is not None:
        log(f"images: cached in {imgdir} (built in {cached.build_seconds:.0f} s)")
        return cached
    t0 = time.monotonic()
    imgdir.mkdir(parents=True, exist_ok=True)
    os.chmod(imgdir, 0o755)  # nginx workers may run as nobody
    free = shutil.disk_usage(imgdir).free
    need = 4 * GIB + 1 * GIB + 4 * GIB + 2 * GIB  # 4g + 1g + temporary sparse 4g + 16g's data, with slack
    log(f"images: building in {imgdir} (free space {free / GIB:.1f} GiB, need about {need / GIB:.0f} GiB)")
    if free < need:
        raise RuntimeError(
            f"not enough space in {imgdir}: {free / GIB:.1f} GiB free, need {need / GIB:.0f} GiB"
        )
    staging = workdir / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "usr").mkdir(parents=True)
    try:
        subtrees = pick_subtrees(tree_budget, log)
        for src, _ in subtrees:
            copy_tree(src, staging / src.lstrip("/"))
        tree_bytes = tree_size(str(staging / "usr"))
        rnd = write_random_files(staging / "random", random_bytes)
        log(f"  staging: {tree_bytes / MIB:.0f} MiB of /usr + {rnd / MIB:.0f} MiB random")

        sparse4 = imgdir / "fs4g.sparse"
        make_fs(staging, sparse4, 4 * GIB, log)
        img4 = imgdir / "img4g.raw"
        fully_allocate(sparse4, img4, log)
        info4 = describe("img4g", img4)

        img16 = imgdir / "img16g.raw"
        img16.unlink(missing_ok=True)
        run(["cp", "--sparse=always", str(sparse4), str(img16)], log)
        os.truncate(img16, 16 * GIB)
        info16 = describe("img16g", img16, data_clusters=info4.data_clusters)
        sparse4.unlink()

        # 1 GiB: the random files plus a small /usr subtree
        small = workdir / "staging1g"
        shutil.rmtree(small, ignore_errors=True)
        small.mkdir()
        (staging / "random").rename(small / "random")
        for src, size in subtrees:
            if size < 150 * MIB:
                copy_tree(src, small / src.lstrip("/"))
                break
        sparse1 = imgdir / "fs1g.sparse"
        make_fs(small, sparse1, 1 * GIB, log)
        img1 = imgdir / "img1g.raw"
        fully_allocate(sparse1, img1, log)
        sparse1.unlink()
        info1 = describe("img1g", img1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(workdir / "staging1g", ignore_errors=True)
    for p in (img4, img1, img16):
        os.chmod(p, 0o644)
    result = ImageSet(
        recipe=RECIPE,
        images={i.name: i for i in (info4, info1, info16)},
        tree_bytes=tree_bytes,
        random_bytes=rnd,
        subtrees=[s for s, _ in subtrees],
        build_seconds=time.monotonic() - t0,
    )
    raw = asdict(result)
    (imgdir / "meta.json").write_text(json.dumps(raw, indent=2) + "\n")
    log(f"images: built in {result.build_seconds:.0f} s")
    return result
