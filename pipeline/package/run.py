"""The package stage: an OVA or a tarball (UEC, or a disk in a tar) read as a tar stream, its disks
converted one after the other as they stream by, its kernel and ramdisk copied unchanged.

    ... sniff (tar) -> package: for each member -> [unwrap -> sniff -> decode -> ... -> sink]

Nothing is extracted: a member's bytes are copied from the archive's chunks into the member's own
pooled chunks and fed to a conversion that runs while they arrive. Every output is written with its
commit deferred; the runner commits them all only once the package has been read to its end and
checked (manifest digests, OVF capacities and formats), so a package that fails leaves nothing.

OVA (DSP0243): the OVF descriptor comes first; small members before it (a manifest, a certificate,
HOLD_BUDGET bytes in all) are held in memory and replayed once it has been read. Without a descriptor
the archive is a tarball: members named like a disk image are converted, `*vmlinuz*` / `*initrd*` /
`*loader*` members (UEC's AKI and ARI) are copied unchanged, anything else is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pipeline import log
from pipeline.aqueue import ClosableQueue
from pipeline.buffers import BufferPool, Chunk
from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage, UsageError
from pipeline.package.manifest import Manifest, parse_manifest
from pipeline.package.ovf import MAX_DESCRIPTOR, OvfDescriptor, OvfDisk, check_member_name, parse_ovf
from pipeline.package.tar import ChunkCursor, Member, members
from pipeline.settings import MiB

MAX_OUTPUTS = 64  # each deferred output holds a file descriptor or an S3 part 1 until the commit
MAX_LISTED = 100  # skipped members named in the summary
HOLD_BUDGET = 8 * MiB  # members before the OVF descriptor kept in memory to be replayed after it
MAX_MANIFEST = 1 * MiB
LATE_ALGORITHMS = ("sha1", "sha256", "sha512")  # what a manifest that comes late may ask for

DISK_SUFFIXES = (".img", ".raw", ".iso", ".qcow2", ".qcow", ".vmdk", ".vhd", ".vhdx", ".vdi", ".dsk", ".ami")
WRAP_SUFFIXES = ("", ".gz", ".xz", ".bz2", ".zst")
KERNEL_NAME = re.compile(r"(vmlinu[xz]|bzimage|-kernel|\.aki$)", re.IGNORECASE)
RAMDISK_NAME = re.compile(r"(initrd|initramfs|loader|\.ari$)", re.IGNORECASE)
OUTPUT_SUFFIX = {"kernel": ".aki", "ramdisk": ".ari"}  # EC2's and Glance's names for them


def member_kind(name: str) -> str | None:
    """A tarball member's role from its name: "kernel", "ramdisk", "disk" or None (skipped)."""
    base = posixpath.basename(name)
    if KERNEL_NAME.search(base):
        return "kernel"
    if RAMDISK_NAME.search(base):
        return "ramdisk"
    low = base.lower()
    if any(low.endswith(d + w) for d in DISK_SUFFIXES for w in WRAP_SUFFIXES):
        return "disk"
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """One output of a package: what the member is, and where and how it goes."""

    member: str
    size: int | None  # None: a loose OVF's disk served without a length
    kind: str  # "disk", "kernel" or "ramdisk"
    spec: str  # DST of this output
    index: int  # 1-based, among the package's disks (0 for a kernel or ramdisk)
    disk_id: str | None = None  # the OVF's diskId, or the member's stem
    capacity: int | None = None  # what the OVF says, checked against the disk's own virtual size
    expect_format: str | None = None  # "vmdk" when the OVF says so


def check_against_ovf(target: Target, source_format: str, virtual_size: int) -> None:
    """What the OVF says of a disk must be what its file is: a mismatch refuses the package."""
    if target.expect_format is not None and source_format != target.expect_format:
        raise CorruptImage(
            f"OVF says disk {target.disk_id} ({target.member}) is {target.expect_format}, "
            f"but the file is {source_format or 'empty'}"
        )
    if target.capacity is not None and virtual_size != target.capacity:
        raise CorruptImage(
            f"OVF says disk {target.disk_id} holds {target.capacity} bytes, its file {target.member} "
            f"holds {virtual_size}"
        )


# Runs one member's conversion from its chunk queue; returns the member's summary (without digests).
ConvertMember = Callable[[ClosableQueue[Chunk], Target], Coroutine[Any, Any, dict[str, Any]]]


@dataclass(slots=True)
class PackageContext:
    spec: str  # SRC, for messages
    dst: str
    output_format: str
    disk_choice: int | None
    queue_depth: int
    convert: ConvertMember
    report: dict[str, Any] = field(default_factory=dict)


def safe_name(text: str) -> str:
    """A name from the package made fit to be one path component of an output: no separators, no
    leading dot (so never "." or ".."), nothing but letters, digits, ".", "_" and "-"."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:200]
    return "_" + name if not name or name.startswith(".") else name


def _stem(name: str) -> str:
    base = posixpath.basename(name)
    for suffix in (".gz", ".xz", ".bz2", ".zst"):
        base = base.removesuffix(suffix)
    stem, dot, _ext = base.rpartition(".")
    return safe_name(stem if dot else base)


def output_spec(dst: str, kind: str, name: str, index: int, several: bool, output_format: str) -> str:
    """DST of one output. A template ({disk}, {index}) is filled in; a prefix ending in / gets the
    disk's name; several disks need one of the two. A kernel or ramdisk is named from DST."""
    templated = "{disk}" in dst or "{index}" in dst
    ext = ".qcow2" if output_format == "qcow2" else ".raw"
    if kind != "disk":
        if dst.endswith("/"):
            return dst + posixpath.basename(name)
        base = dst.replace("{disk}", name).replace("{index}", str(index)) if templated else dst
        for known in (".qcow2", ".img", ".raw"):
            base = base.removesuffix(known)
        return base + OUTPUT_SUFFIX[kind]
    if dst.endswith("/"):
        return f"{dst}{name}{ext}"
    if templated:
        return dst.replace("{disk}", name).replace("{index}", str(index))
    if several:
        raise UsageError(
            f"the package holds several disks; give DST a {{disk}} or {{index}} template "
            f"(e.g. {dst}.{{index}}) or a prefix ending in /, or pick one with --disk N"
        )
    return dst


class _Hashers:
    def __init__(self, algorithms: set[str]) -> None:
        self.h = {a: hashlib.new(a) for a in sorted(algorithms)}

    def update(self, data: memoryview | bytes) -> None:
        for h in self.h.values():
            h.update(data)

    def digests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.h.items()}


class Package:
    def __init__(self, ctx: PackageContext, pool: BufferPool) -> None:
        self.ctx = ctx
        self.pool = pool
        self.log = log.get(stage="package", source=ctx.spec)
        self.mode: str | None = None  # "ova" or "tarball", once known
        self.descriptor: OvfDescriptor | None = None
        self.manifest: Manifest | None = None
        self.digests: dict[str, dict[str, str]] = {}  # member -> algorithm -> hex
        self.held: list[tuple[str, bytes]] = []
        self.held_bytes = 0
        self.ova_disks: dict[str, tuple[int, OvfDisk]] = {}  # href -> (index, disk), the chosen ones
        self.converted: set[str] = set()
        self.outputs: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.skipped_count = 0
        self.disks_seen = 0
        self.destinations: set[str] = set()

    async def run(self, inq: ClosableQueue[Chunk]) -> dict[str, Any]:
        cursor = ChunkCursor(inq)
        try:
            async for m in members(cursor):
                await self._member(m, cursor)
            await self.finish()
            cursor.release()
            async for chunk in inq:  # the archive's padding after its end-of-archive blocks
                chunk.release()
        finally:
            cursor.release()
        return self.report()

    # -- members ------------------------------------------------------------------------------------

    async def _member(self, m: Member, cursor: ChunkCursor) -> None:
        name = check_member_name(m.name)
        if m.link:
            self._skip(name)
            if self.descriptor is not None and name in self._hrefs():
                raise UnsafeImage(f"package member {name} is a link; a package's files must be plain files")
            return
        if not m.regular:
            return
        low = name.lower()
        if low.endswith(".ovf"):
            await self.descriptor_member(name, await self._read_small(name, m.size, cursor, MAX_DESCRIPTOR))
            return
        if low.endswith(".mf"):
            self.manifest_member(name, await self._read_small(name, m.size, cursor, MAX_MANIFEST))
            return
        if self.mode is None:
            if self.held_bytes + m.size <= HOLD_BUDGET:
                self.held.append(
                    (name, await self._read_small(name, m.size, cursor, HOLD_BUDGET, hash_it=False))
                )
                self.held_bytes += m.size
                return
            await self._become("tarball")
        await self.content_member(name, m.size, cursor.pieces(m.size))

    def _skip(self, name: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(name)

    async def _read_small(
        self, name: str, size: int, cursor: ChunkCursor, limit: int, hash_it: bool = True
    ) -> bytes:
        if size > limit:
            raise UnsafeImage(
                f"package member {name} is {size} bytes, more than the {limit >> 20} MiB allowed"
            )
        data = await cursor.read(size)
        if len(data) < size:
            raise CorruptImage(f"archive ends inside {name}, {size - len(data)} bytes short")
        if hash_it:
            self.hash_bytes(name, data)
        return data

    def hash_bytes(self, name: str, data: bytes) -> None:
        h = _Hashers(self._algorithms(name))
        h.update(data)
        self._digested(name, h.digests())

    async def descriptor_member(self, name: str, data: bytes) -> None:
        if self.descriptor is not None:
            raise CorruptImage(f"package has a second OVF descriptor, {name}")
        if self.mode == "tarball":
            raise UnsupportedImage(
                f"OVF descriptor {name} comes after the package's disk data (over {HOLD_BUDGET >> 20} MiB "
                "before it); an OVA must start with its descriptor"
            )
        self.descriptor = parse_ovf(data)
        chosen = [d for d in self.descriptor.disks if d.file is not None]
        if self.ctx.disk_choice is not None:
            if self.ctx.disk_choice > len(chosen):
                raise UsageError(f"--disk {self.ctx.disk_choice}: the package has {len(chosen)} disk(s)")
            picked = {self.ctx.disk_choice}
        else:
            picked = set(range(1, len(chosen) + 1))
        for index, disk in enumerate(chosen, 1):
            assert disk.file is not None
            if disk.file.href in self.ova_disks:
                raise CorruptImage(f"OVF: two disks use the same file, {disk.file.href}")
            if index in picked:
                self.ova_disks[disk.file.href] = (index, disk)
        self.log.info(
            "OVF descriptor",
            member=name,
            version=self.descriptor.version,
            disks=len(chosen),
            name=self.descriptor.name,
        )
        await self._become("ova")

    def manifest_member(self, name: str, data: bytes) -> None:
        if self.manifest is not None:
            raise CorruptImage(f"package has a second manifest, {name}")
        self.manifest = parse_manifest(data)
        for warning in self.manifest.warnings:
            self.log.warning("manifest line ignored", member=name, reason=warning)
        for seen in list(self.digests):
            self._verify(seen)

    async def _become(self, mode: str) -> None:
        self.mode = mode
        held, self.held, self.held_bytes = self.held, [], 0
        for name, data in held:
            await self.content_member(name, len(data), _once(memoryview(data)))

    async def content_member(self, name: str, size: int | None, pieces: AsyncIterator[memoryview]) -> None:
        """A member that is neither descriptor nor manifest: converted, copied or skipped."""
        target = self._target(name, size)
        algorithms = self._algorithms(name) | ({"sha256"} if target is not None else set())
        hashers = _Hashers(algorithms)
        if target is None:
            self._skip(name)
            async for piece in pieces:
                hashers.update(piece)
        else:
            result = await self._convert(target, pieces, hashers)
            result["sha256"] = hashers.digests()["sha256"]
            self.outputs.append(result)
        self._digested(name, hashers.digests())

    def _target(self, name: str, size: int | None) -> Target | None:
        several = False
        if self.mode == "ova":
            if name not in self.ova_disks:
                return None
            index, disk = self.ova_disks[name]
            self.converted.add(name)
            several = len(self.ova_disks) > 1
            expect = "vmdk" if disk.format and "vmdk" in disk.format.lower() else None
            spec = output_spec(
                self.ctx.dst, "disk", safe_name(disk.disk_id), index, several, self.ctx.output_format
            )
            return self._unique(Target(name, size, "disk", spec, index, disk.disk_id, disk.capacity, expect))
        kind = member_kind(name)
        if kind is None:
            return None
        if kind == "disk":
            self.disks_seen += 1
            index = self.disks_seen
            if self.ctx.disk_choice is not None and index != self.ctx.disk_choice:
                return None
            # The first disk takes DST as it is; a second one without a template is a usage error
            # (which fails the whole package: nothing has been committed yet).
            several = self.ctx.disk_choice is None and index > 1
        elif self.ctx.disk_choice is not None:
            return None  # --disk N: that disk alone
        else:
            index = 0
        spec = output_spec(self.ctx.dst, kind, _stem(name), index, several, self.ctx.output_format)
        return self._unique(Target(name, size, kind, spec, index, _stem(name)))

    def _unique(self, target: Target) -> Target:
        if target.spec in self.destinations:
            raise UsageError(
                f"two members of the package ({target.member} and one before it) would both be written to "
                f"{target.spec}; put {{index}} in DST"
            )
        if len(self.destinations) >= MAX_OUTPUTS:
            raise UnsafeImage(f"package has more than {MAX_OUTPUTS} disks, kernels and ramdisks to write")
        self.destinations.add(target.spec)
        return target

    async def _convert(
        self, target: Target, pieces: AsyncIterator[memoryview], hashers: _Hashers
    ) -> dict[str, Any]:
        q: ClosableQueue[Chunk] = ClosableQueue(self.ctx.queue_depth)
        self.log.info("member", member=target.member, kind=target.kind, destination=target.spec)
        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(self.ctx.convert(q, target))
                await _feed(pieces, q, self.pool, hashers)
        except BaseExceptionGroup as group:
            # The member's own error, not a group of one: it carries the member's name and stage.
            for exc in group.exceptions:
                if not isinstance(exc, asyncio.CancelledError):
                    raise exc from None
            raise
        result: dict[str, Any] = task.result()
        return result

    # -- digests -------------------------------------------------------------------------------------

    def _algorithms(self, name: str) -> set[str]:
        if self.manifest is None:
            # An OVA's manifest may come after the members it lists: digest them every way it may ask.
            # A tarball has no manifest.
            return set(LATE_ALGORITHMS) if self.mode != "tarball" else set()
        entry = self.manifest.entries.get(name)
        return {entry.algorithm} if entry is not None else set()

    def _digested(self, name: str, digests: dict[str, str]) -> None:
        self.digests[name] = digests
        self._verify(name)

    def _verify(self, name: str) -> None:
        if self.manifest is None:
            return
        entry = self.manifest.entries.get(name)
        if entry is None:
            return
        got = self.digests[name].get(entry.algorithm)
        if got != entry.digest:
            raise CorruptImage(
                f"manifest: {name} has {entry.algorithm} {str(got)[:16]}..., the manifest says "
                f"{entry.digest[:16]}...; the package is corrupt or was altered"
            )

    # -- the end -------------------------------------------------------------------------------------

    async def finish(self) -> None:
        if self.mode is None:
            await self._become("tarball")
        if self.mode == "ova":
            missing = sorted(set(self.ova_disks) - self.converted)
            if missing:
                raise CorruptImage(f"OVF names disk file {missing[0]}, which the package does not hold")
        if self.manifest is not None:
            for name in self.manifest.entries:
                if name not in self.digests:
                    raise CorruptImage(f"manifest lists {name}, which the package does not hold")
        if not self.outputs:
            raise UnsupportedImage(
                "archive holds no disk image (no OVF descriptor, and no member named like a disk: "
                f"{', '.join(n[:100] for n in self.skipped[:5]) or 'no members'})"
            )

    def _hrefs(self) -> set[str]:
        assert self.descriptor is not None
        return {f.href for f in self.descriptor.files}

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "package": self.mode,
            "outputs": self.outputs,
            "skipped_members": self.skipped,
            "skipped_count": self.skipped_count,
        }
        if self.descriptor is not None:
            report["ovf"] = self.descriptor.to_json()
        if self.manifest is not None:
            report["manifest"] = f"verified ({len(self.manifest.entries)} files)"
        else:
            report["manifest"] = "none"
        return report


async def _once(view: memoryview) -> AsyncIterator[memoryview]:
    if len(view):
        yield view


def _copy_and_hash(dst: memoryview, src: memoryview, hashers: _Hashers) -> None:
    dst[:] = src
    hashers.update(src)


async def _feed(
    pieces: AsyncIterator[memoryview], q: ClosableQueue[Chunk], pool: BufferPool, hashers: _Hashers
) -> None:
    """Copy a member's bytes into full pooled chunks of its own (the archive's chunks straddle members)."""
    chunk: Chunk | None = None
    try:
        async for piece in pieces:
            while piece:
                if chunk is None:
                    chunk = await pool.chunk()
                take = min(len(piece), pool.size - chunk.length)
                # Copy and digest on a worker thread (both release the GIL): at ~1 GB/s for SHA-256
                # they would otherwise hold the event loop for seconds per GiB.
                await asyncio.to_thread(
                    _copy_and_hash, chunk.space(chunk.length, chunk.length + take), piece[:take], hashers
                )
                chunk.length += take
                piece = piece[take:]
                if chunk.length == pool.size:
                    full, chunk = chunk, None
                    await q.put(full)
        if chunk is not None:
            full, chunk = chunk, None
            await q.put(full)
        await q.close()
    finally:
        if chunk is not None:
            chunk.release()


async def chunk_views(q: ClosableQueue[Chunk]) -> AsyncIterator[memoryview]:
    """A source's chunks as views, each released once the next is asked for."""
    async for chunk in q:
        try:
            yield chunk.view()
        finally:
            chunk.release()


async def read_loose_descriptor(q: ClosableQueue[Chunk]) -> bytes:
    """A loose OVF descriptor (SRC is the .ovf), read whole; refused as soon as it passes MAX_DESCRIPTOR."""
    data = bytearray()
    async for chunk in q:
        data += chunk.view()
        chunk.release()
        if len(data) > MAX_DESCRIPTOR:
            raise UnsafeImage(f"OVF descriptor is over {MAX_DESCRIPTOR >> 20} MiB")
    return bytes(data)


async def package_stage(inq: ClosableQueue[Chunk], ctx: PackageContext, pool: BufferPool) -> None:
    ctx.report.update(await Package(ctx, pool).run(inq))
