"""OVF manifests (.mf): a digest per package member, checked while each member streams past.

Lines look like `SHA256(disk.vmdk)= 3b1f...` (ovftool and VirtualBox put one space after '='; both
sides are optional here, CRLF too). A line that is not of that shape, or names an algorithm we do not
compute (MD5, ...), becomes a warning for the caller to log: that member simply goes unchecked, as with
no manifest at all. A line that is of that shape but wrong (digest of the wrong length, a name leaving
the package, one name with two digests) refuses the package: it can only be damage or a trick.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pipeline.errors import CorruptImage, UnsafeImage
from pipeline.package.ovf import _show, check_member_name

MAX_MANIFEST = 1024 * 1024  # a larger manifest is refused (UnsafeImage): it is read whole, in memory

DIGEST_HEX_LENGTH = {"sha1": 40, "sha256": 64, "sha512": 128}

_LINE = re.compile(r"(?P<algo>[A-Za-z0-9-]+)\s*\((?P<name>.+)\)\s*=\s*(?P<digest>\S*)")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One member's expected digest."""

    name: str  # as check_member_name normalised it
    algorithm: str  # "sha1" | "sha256" | "sha512"
    digest: str  # lower-case hex, of the algorithm's length


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: dict[str, ManifestEntry]  # by normalised member name
    warnings: tuple[str, ...]  # one per line that was skipped, for the caller to log


def parse_manifest(data: bytes) -> Manifest:
    """Parse a .mf file. UnsafeImage: over MAX_MANIFEST, or a name leaving the package. CorruptImage:
    a digest of the wrong length or not hex, one name listed with two different digests."""
    if len(data) > MAX_MANIFEST:
        raise UnsafeImage(f"manifest: {len(data)} bytes, over the {MAX_MANIFEST} byte limit")
    entries: dict[str, ManifestEntry] = {}
    warnings: list[str] = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "backslashreplace")
            warnings.append(f"manifest line {number}: not UTF-8, skipped: {_show(text)}")
            continue
        if not line:
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            warnings.append(f"manifest line {number}: not 'ALGORITHM(name)= digest', skipped: {_show(line)}")
            continue
        algorithm = match["algo"].lower()
        if algorithm not in DIGEST_HEX_LENGTH:
            warnings.append(f"manifest line {number}: {match['algo']} is not checked, skipped: {_show(line)}")
            continue
        name = check_member_name(match["name"])
        digest = match["digest"].lower()
        want = DIGEST_HEX_LENGTH[algorithm]
        if not _HEX.fullmatch(digest) or len(digest) != want:
            raise CorruptImage(
                f"manifest: {algorithm.upper()}({name}) is {_show(match['digest'], 40)},"
                f" not {want} hex digits"
            )
        entry = ManifestEntry(name, algorithm, digest)
        if entries.get(name, entry) != entry:
            # Which one would we check? Either answer lets a tampered member through.
            raise CorruptImage(f"manifest: {_show(name)} is listed twice with different digests")
        entries[name] = entry
    return Manifest(entries, tuple(warnings))


class Digester:
    """Hashes one member as its bytes stream past, then checks the manifest's digest."""

    __slots__ = ("_entry", "_hash")

    def __init__(self, entry: ManifestEntry) -> None:
        self._entry = entry
        self._hash = hashlib.new(entry.algorithm)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)  # hashlib reads a memoryview in place: no copy of the chunk

    def verify(self) -> None:
        got, want = self._hash.hexdigest(), self._entry.digest
        if got != want:
            raise CorruptImage(
                f"manifest: {self._entry.name} has {self._entry.algorithm} {got[:16]}...,"
                f" the manifest says {want[:16]}..."
            )
