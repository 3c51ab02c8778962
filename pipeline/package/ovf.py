"""OVF descriptors (DMTF DSP0243, OVF 1.x and 2.x): which files a package holds and which disks they are.

Pure parsing, no I/O: the OVA reader hands over the descriptor's bytes. The descriptor is untrusted XML,
so it goes through defusedxml with DTDs forbidden (which also rules out entity declarations, the
billion-laughs expansion and external entities) and a size cap before any parsing.

Elements are matched by local name, not by prefix: VMware writes `ovf:Disk` under a prefixed root,
VirtualBox writes `Disk` in the default namespace, and OVF 2.0 only changes the namespace URI.
Attributes are read in either OVF envelope namespace, or unqualified (hand-written descriptors).

What the converter needs is strict (files, disks, capacities: a broken one refuses the package); the
summary fields (name, OS, CPUs, memory) are informational and fall back to None when unreadable, so
a good disk is never refused over a RAM figure. `.cert` members are not parsed at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException, DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

from pipeline.errors import CorruptImage, UnsafeImage, UnsupportedImage

MAX_DESCRIPTOR = 4 * 1024 * 1024  # a descriptor larger than this is refused (UnsafeImage)
MAX_CAPACITY = 1 << 63  # bytes; beyond any disk a format can describe: a typo or an attack

OVF_NAMESPACES = {
    "http://schemas.dmtf.org/ovf/envelope/1": "1.0",
    "http://schemas.dmtf.org/ovf/envelope/2": "2.0",
}
RESOURCE_CPU = 3
RESOURCE_MEMORY = 4

_DIGITS = re.compile(r"[0-9]{1,30}")  # not int(): it also takes "+1", " 1", "1_0" and 4300 digits
_PROPERTY_REF = re.compile(r"\$\{([^}]{1,200})\}")
_DRIVE = re.compile(r"[A-Za-z]:")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


# ---------------------------------------------------------------- member names


def _show(text: str, limit: int = 80) -> str:
    """A name as it may appear in a one-line message: quoted, control characters escaped, bounded."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def check_member_name(name: str) -> str:
    """The name of a tar member or an ovf:href, normalised; UnsafeImage if it could leave the package.

    Refused: empty, NUL, absolute ('/x', '\\x', '\\\\server\\x'), a drive letter ('C:x'), a URL or any
    'scheme:' prefix (OVF allows http: hrefs: we never fetch what a package points at), and a '..'
    component with either slash. Returned: the name with '.' and empty components dropped (so './a//b'
    is 'a/b', as tar and ovftool both write), or '.' for the package root itself ('./', which
    `tar -C dir -cf x.ova .` writes first). Percent-escapes are kept as they are: a member named
    '%2e%2e' is a file of that name, never a parent directory.
    """
    if not name:
        raise UnsafeImage("package member name is empty")
    if "\0" in name:
        raise UnsafeImage(f"package member name {_show(name)} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeImage(f"package member name {_show(name)} is an absolute path")
    if name.startswith("\\"):
        raise UnsafeImage(f"package member name {_show(name)} is an absolute Windows path")
    if _DRIVE.match(name):
        raise UnsafeImage(f"package member name {_show(name)} starts with a drive letter")
    if _SCHEME.match(name):
        raise UnsafeImage(f"package member name {_show(name)} is a URL, not a file in the package")
    # Backslash counts as a separator here: a Windows-made package or consumer would read it as one.
    if ".." in re.split(r"[/\\]", name):
        raise UnsafeImage(f"package member name {_show(name)} has a '..' component")
    kept = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(kept) or "."


# ---------------------------------------------------------------- units

# DSP0004 programmatic units with a byte base ("byte", "byte * 2^20", "byte*10^9", "kilobyte", ...),
# plus the older CIM names VirtualBox writes ("MegaBytes": VirtualBox means 2^20 there).
_NAMED_UNITS = {
    "bytes": 1,
    "kilobytes": 1 << 10,
    "megabytes": 1 << 20,
    "gigabytes": 1 << 30,
    "terabytes": 1 << 40,
    "kb": 1 << 10,
    "mb": 1 << 20,
    "gb": 1 << 30,
    "tb": 1 << 40,
}
_PREFIXED_BYTE = {
    "byte": 1,
    "kilobyte": 10**3,
    "megabyte": 10**6,
    "gigabyte": 10**9,
    "terabyte": 10**12,
    "petabyte": 10**15,
    "kibibyte": 1 << 10,
    "mebibyte": 1 << 20,
    "gibibyte": 1 << 30,
    "tebibyte": 1 << 40,
    "pebibyte": 1 << 50,
}
_POWER = re.compile(r"([0-9]{1,4})\^([0-9]{1,3})")
_MAX_MULTIPLIER = 1 << 64


def byte_multiplier(units: str) -> int | None:
    """Bytes per unit of a DSP0004 byte unit ('byte * 2^30' -> 2**30), or None if it is not one.

    Only products are taken ('byte / 8' is not a whole number of bytes), with exactly one byte term,
    and every factor is bounded first: '2^999999999' is refused, not computed.
    """
    compact = "".join(units.split()).lower()
    if compact in _NAMED_UNITS:
        return _NAMED_UNITS[compact]
    multiplier, bytes_terms = 1, 0
    for term in compact.split("*"):
        if term.removesuffix("s") in _PREFIXED_BYTE:
            multiplier *= _PREFIXED_BYTE[term.removesuffix("s")]
            bytes_terms += 1
        elif power := _POWER.fullmatch(term):
            base, exponent = int(power[1]), int(power[2])
            if base < 2 or exponent > 64:  # bounded before computing: base <= 9999 by the pattern
                return None
            multiplier *= base**exponent
        elif _DIGITS.fullmatch(term):
            multiplier *= int(term)
        else:
            return None
        if multiplier == 0 or multiplier > _MAX_MULTIPLIER:
            return None
    return multiplier if bytes_terms == 1 else None


# ---------------------------------------------------------------- descriptor


@dataclass(frozen=True, slots=True)
class OvfFile:
    """A <References><File>: one member of the package."""

    file_id: str  # ovf:id
    href: str  # ovf:href, as check_member_name normalised it
    size: int | None  # ovf:size, bytes
    compression: str | None  # "gzip" or None (ovf:compression "identity" or absent)


@dataclass(frozen=True, slots=True)
class OvfDisk:
    """A <DiskSection><Disk>: one virtual disk and the file that holds it."""

    disk_id: str  # ovf:diskId
    file: OvfFile | None  # resolved ovf:fileRef; None: a blank disk created at deployment
    capacity: int  # bytes
    format: str | None  # ovf:format URI
    subformat: str | None  # the URI's fragment: "streamOptimized", "monolithicSparse", ...


@dataclass(frozen=True, slots=True)
class OvfDescriptor:
    """What a package's .ovf says: its files, its disks in DiskSection order, and a short VM summary."""

    version: str  # "1.0" or "2.0", from the envelope namespace
    files: tuple[OvfFile, ...]
    disks: tuple[OvfDisk, ...]
    name: str | None  # VirtualSystem ovf:id, else its <Name>
    os_type: str | None  # OperatingSystemSection ovf:osType, else <Description>, else ovf:id
    cpus: int | None  # VirtualHardwareSection Item ResourceType 3
    memory_mib: int | None  # Item ResourceType 4, in MiB

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "os_type": self.os_type,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disks": [
                {
                    "disk_id": d.disk_id,
                    "href": d.file.href if d.file else None,
                    "capacity": d.capacity,
                    "format": d.format,
                }
                for d in self.disks
            ],
        }


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(parent: Element, name: str) -> list[Element]:
    return [child for child in parent if isinstance(child.tag, str) and _local(child.tag) == name]


def _child(parent: Element, name: str) -> Element | None:
    found = _children(parent, name)
    return found[0] if found else None


def _text(parent: Element, name: str) -> str | None:
    child = _child(parent, name)
    text = (child.text or "").strip() if child is not None else ""
    return text or None


def _attr(element: Element, name: str) -> str | None:
    """ovf:NAME in either envelope namespace, or an unqualified NAME; surrounding blanks removed."""
    for ns in OVF_NAMESPACES:
        value = element.get(f"{{{ns}}}{name}")
        if value is not None:
            return value.strip()
    value = element.get(name)
    return value.strip() if value is not None else None


def _corrupt(reason: str) -> CorruptImage:
    return CorruptImage(f"OVF descriptor: {reason}")


def _parse_xml(data: bytes) -> Element:
    if len(data) > MAX_DESCRIPTOR:
        raise UnsafeImage(f"OVF descriptor: {len(data)} bytes, over the {MAX_DESCRIPTOR} byte limit")
    try:
        # forbid_dtd: OVF has no use for a DTD, and every entity trick needs one.
        return SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DTDForbidden as e:
        doctype = _show(e.name)
        raise UnsafeImage(f"OVF descriptor: has a DTD (DOCTYPE {doctype}), which can declare entities") from e
    except EntitiesForbidden as e:
        raise UnsafeImage(f"OVF descriptor: declares the entity {_show(e.name)}") from e
    except ExternalReferenceForbidden as e:
        raise UnsafeImage(f"OVF descriptor: refers to the external {_show(e.sysid or '')}") from e
    except DefusedXmlException as e:
        raise UnsafeImage(f"OVF descriptor: refused by the XML guard: {e}") from e
    except ParseError as e:
        raise _corrupt(f"not well-formed XML: {e}") from e


def _envelope_version(root: Element) -> str:
    ns, _, local = root.tag.rpartition("}")
    ns = ns.lstrip("{")
    if local != "Envelope":
        raise _corrupt(f"the root element is {_show(root.tag)}, not an OVF Envelope")
    if ns not in OVF_NAMESPACES:
        raise UnsupportedImage(f"OVF descriptor: envelope namespace {_show(ns)} is not OVF 1.x or 2.x")
    return OVF_NAMESPACES[ns]


def _size_attr(element: Element, name: str, what: str) -> int | None:
    value = _attr(element, name)
    if value is None:
        return None
    if not _DIGITS.fullmatch(value):
        raise _corrupt(f"{what} has ovf:{name} {_show(value)}, not a whole number")
    return int(value)


def _files(root: Element) -> tuple[OvfFile, ...]:
    files: list[OvfFile] = []
    ids: set[str] = set()
    hrefs: set[str] = set()
    for refs in _children(root, "References"):
        for element in _children(refs, "File"):
            file_id = _attr(element, "id")
            href = _attr(element, "href")
            if not file_id:
                raise _corrupt(f"a File (href {_show(href or '')}) has no ovf:id")
            what = f"File {_show(file_id)}"
            if file_id in ids:
                raise _corrupt(f"two Files have ovf:id {_show(file_id)}")
            if not href:
                raise _corrupt(f"{what} has no ovf:href")
            name = check_member_name(href)
            if name == ".":
                raise _corrupt(f"{what} has ovf:href {_show(href)}, which names no file")
            # Two Files on one member would give two disks the same bytes (or one the wrong ones).
            if name in hrefs:
                raise _corrupt(f"two Files have ovf:href {_show(name)}")
            # chunkSize: the file is split into NAME.000000000, NAME.000000001, ... members.
            if _attr(element, "chunkSize") is not None:
                raise UnsupportedImage(f"OVF descriptor: {what} is split in chunks (ovf:chunkSize)")
            compression = _attr(element, "compression")
            if compression in (None, "", "identity"):
                compression = None
            elif compression != "gzip":
                raise UnsupportedImage(f"OVF descriptor: {what} has ovf:compression {_show(compression)}")
            ids.add(file_id)
            hrefs.add(name)
            files.append(OvfFile(file_id, name, _size_attr(element, "size", what), compression))
    return tuple(files)


def _properties(root: Element) -> dict[str, str]:
    """ProductSection properties by ovf:key, for capacities written as ${key}."""
    found: dict[str, str] = {}
    for section in root.iter():
        if isinstance(section.tag, str) and _local(section.tag) == "ProductSection":
            for prop in _children(section, "Property"):
                key, value = _attr(prop, "key"), _attr(prop, "value")
                if key and value is not None:
                    found.setdefault(key, value)
    return found


def _capacity(element: Element, disk_id: str, root: Element) -> int:
    what = f"Disk {_show(disk_id)}"
    value = _attr(element, "capacity")
    if not value:
        raise _corrupt(f"{what} has no ovf:capacity")
    if ref := _PROPERTY_REF.fullmatch(value):
        # OVF lets a capacity name a ProductSection property (a size chosen at deployment).
        resolved = _properties(root).get(ref[1])
        if resolved is None:
            raise _corrupt(f"{what} has ovf:capacity {_show(value)}, and no property gives it a value")
        value = resolved
    if not _DIGITS.fullmatch(value):
        raise _corrupt(f"{what} has ovf:capacity {_show(value)}, not a whole number")
    units = _attr(element, "capacityAllocationUnits") or "byte"
    multiplier = byte_multiplier(units)
    if multiplier is None:
        raise _corrupt(f"{what} has ovf:capacityAllocationUnits {_show(units)}, not a unit of bytes")
    capacity = int(value) * multiplier
    if capacity > MAX_CAPACITY:
        raise _corrupt(f"{what} has a capacity of {capacity} bytes, over 2^63")
    return capacity


def _disks(root: Element, files: tuple[OvfFile, ...]) -> tuple[OvfDisk, ...]:
    by_id = {f.file_id: f for f in files}
    disks: list[OvfDisk] = []
    seen: set[str] = set()
    for section in _children(root, "DiskSection"):
        for element in _children(section, "Disk"):
            disk_id = _attr(element, "diskId")
            if not disk_id:
                raise _corrupt("a Disk has no ovf:diskId")
            what = f"Disk {_show(disk_id)}"
            if disk_id in seen:
                raise _corrupt(f"two Disks have ovf:diskId {_show(disk_id)}")
            seen.add(disk_id)
            # A parentRef disk holds only the changes to its parent; converted alone it would read as
            # a whole disk with holes, silently. Same rule as differencing VHD/VHDX.
            parent = _attr(element, "parentRef")
            if parent:
                raise UnsupportedImage(
                    f"OVF descriptor: {what} is a delta of Disk {_show(parent)} (ovf:parentRef)"
                )
            file_ref = _attr(element, "fileRef")
            file: OvfFile | None = None
            if file_ref:
                if file_ref not in by_id:
                    raise _corrupt(f"{what} has ovf:fileRef {_show(file_ref)}, and no File has that id")
                file = by_id[file_ref]
            fmt = _attr(element, "format") or None
            subformat = (fmt.partition("#")[2] or None) if fmt else None
            disks.append(OvfDisk(disk_id, file, _capacity(element, disk_id, root), fmt, subformat))
    return tuple(disks)


def _virtual_system(root: Element) -> Element | None:
    """The first VirtualSystem, at the top or inside (nested) VirtualSystemCollections."""
    for element in root.iter():
        if isinstance(element.tag, str) and _local(element.tag) == "VirtualSystem":
            return element
    return None


def _os_type(system: Element) -> str | None:
    section = _child(system, "OperatingSystemSection")
    if section is None:
        return None
    return _attr(section, "osType") or _text(section, "Description") or _attr(section, "id") or None


def _default_configuration(root: Element) -> str | None:
    """The DeploymentOptionSection's default Configuration (ovf:default="true", else the first)."""
    section = _child(root, "DeploymentOptionSection")
    if section is None:
        return None
    configurations = _children(section, "Configuration")
    for configuration in configurations:
        if (_attr(configuration, "default") or "").lower() in ("true", "1"):
            return _attr(configuration, "id")
    return _attr(configurations[0], "id") if configurations else None


def _quantity(item: Element, default_units: str) -> int | None:
    """VirtualQuantity times AllocationUnits in bytes for memory; None when unreadable."""
    quantity = _text(item, "VirtualQuantity")
    if quantity is None or not _DIGITS.fullmatch(quantity):
        return None
    multiplier = byte_multiplier(_text(item, "AllocationUnits") or default_units)
    return int(quantity) * multiplier if multiplier is not None else None


def _hardware(root: Element, system: Element) -> tuple[int | None, int | None]:
    section = _child(system, "VirtualHardwareSection")
    if section is None:
        return None, None
    configuration = _default_configuration(root)
    cpus: int | None = None
    memory: int | None = None
    for item in _children(section, "Item"):
        # Items may belong to deployment configurations ("small", "large"): take the default one's.
        applies_to = _attr(item, "configuration")
        if applies_to is not None and configuration not in applies_to.split():
            continue
        kind_text = _text(item, "ResourceType") or ""
        kind = int(kind_text) if _DIGITS.fullmatch(kind_text) else None
        if kind == RESOURCE_CPU and cpus is None:
            count = _text(item, "VirtualQuantity")
            cpus = int(count) if count is not None and _DIGITS.fullmatch(count) else None
        elif kind == RESOURCE_MEMORY and memory is None:
            size = _quantity(item, "byte * 2^20")
            memory = size // (1 << 20) if size is not None else None
    return cpus, memory


def parse_ovf(data: bytes) -> OvfDescriptor:
    """Parse an OVF descriptor. UnsafeImage: too large, a DTD/entities, an href leaving the package.
    CorruptImage: not XML, a Disk naming a missing File, two Files on one member, bad numbers.
    UnsupportedImage: chunked or non-gzip compressed files, delta disks, a non-OVF namespace."""
    root = _parse_xml(data)
    version = _envelope_version(root)
    files = _files(root)
    disks = _disks(root, files)
    system = _virtual_system(root)
    name = os_type = None
    cpus = memory = None
    if system is not None:
        name = _attr(system, "id") or _text(system, "Name")
        os_type = _os_type(system)
        cpus, memory = _hardware(root, system)
    return OvfDescriptor(version, files, disks, name, os_type, cpus, memory)
