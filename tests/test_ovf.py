"""OVF descriptors and manifests: the pure parsers the OVA/OVF converter calls (pipeline.package).

Real descriptors (VirtualBox OVF 2.0 and 1.0 exports, a VMware OVF 1.0, a hand-written one inside a
forklift OVA) are checked against what their XML says; they skip where ../shared/testdata/real is not
checked out. Synthetic descriptors cover the hostile cases: entity expansion, external entities,
hrefs that leave the package, and the numbers a converter sizes its output from.
"""

from __future__ import annotations

import hashlib
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.errors import EXIT_REFUSED, CorruptImage, InputRefused, UnsafeImage, UnsupportedImage
from pipeline.package.manifest import (
    MAX_MANIFEST,
    Digester,
    ManifestEntry,
    parse_manifest,
)
from pipeline.package.ovf import (
    MAX_DESCRIPTOR,
    byte_multiplier,
    check_member_name,
    parse_ovf,
)
from tests.helpers import REAL_DATA

GiB = 1 << 30
MiB = 1 << 20
VMDK_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html"
OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"


def real(name: str) -> Path:
    """A file of the real corpus, or a skip where the corpus is absent (a user's clone)."""
    path = REAL_DATA / name
    if not path.exists():
        pytest.skip(f"{name} is not in {REAL_DATA}")
    return path


def ova_member(ova: str, suffix: str) -> tuple[bytes, dict[str, int]]:
    """The first member ending in `suffix`, and every member's size by name (tarfile: tests only)."""
    with tarfile.open(real(ova)) as tar:
        members = tar.getmembers()
        ovf = next(m for m in members if m.name.endswith(suffix))
        f = tar.extractfile(ovf)
        assert f is not None
        return f.read(), {m.name: m.size for m in members}


def envelope(body: str, *, ns: str = OVF1, system: str = "") -> bytes:
    """A minimal descriptor in the default namespace, ovf: prefix bound too (as VirtualBox writes)."""
    return (
        f'<?xml version="1.0"?>\n<Envelope xmlns="{ns}" xmlns:ovf="{ns}" xmlns:rasd="{RASD}">'
        f"{body}{system}</Envelope>"
    ).encode()


def one_disk(disk_attrs: str, file_attrs: str = 'ovf:id="file1" ovf:href="disk.vmdk"') -> bytes:
    return envelope(
        f"<References><File {file_attrs}/></References>"
        f'<DiskSection><Info>x</Info><Disk ovf:diskId="d1" {disk_attrs}/></DiskSection>'
    )


def refused(cls: type[InputRefused], data: bytes, *words: str) -> str:
    """parse_ovf refuses `data` with `cls` (exit status 3), in one line holding every one of `words`."""
    with pytest.raises(cls) as info:
        parse_ovf(data)
    assert info.value.exit_status == EXIT_REFUSED
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


# ---------------------------------------------------------------- real descriptors


def test_real_virtualbox_ovf20_export() -> None:
    d = parse_ovf(real("virtualbox-ovf20-export/ubuntu.2.0.ovf").read_bytes())
    assert d.version == "2.0"
    assert [(f.file_id, f.href, f.size, f.compression) for f in d.files] == [
        ("file1", "ubuntu.2.0-disk1.vmdk", None, None)  # VirtualBox writes no ovf:size
    ]
    (disk,) = d.disks
    assert disk.disk_id == "vmdisk1"
    assert disk.file == d.files[0]
    assert disk.capacity == 8 * GiB  # plain bytes, no capacityAllocationUnits
    assert disk.format == f"{VMDK_URI}#streamOptimized"
    assert disk.subformat == "streamOptimized"
    # The OS comes from <Description> (ovf:id 94 is CIM's Ubuntu 64-bit); memory in "MegaBytes".
    assert (d.name, d.os_type, d.cpus, d.memory_mib) == ("ubuntu", "Ubuntu_64", 1, 512)
    assert d.to_json() == {
        "name": "ubuntu",
        "os_type": "Ubuntu_64",
        "cpus": 1,
        "memory_mib": 512,
        "disks": [
            {
                "disk_id": "vmdisk1",
                "href": "ubuntu.2.0-disk1.vmdk",
                "capacity": 8 * GiB,
                "format": f"{VMDK_URI}#streamOptimized",
            }
        ],
    }


def test_real_vmware_ovf10_prefixed() -> None:
    """Every element is ovf:-prefixed here; capacity is '1' in 'byte * 2^30'; the CPU Item's
    AllocationUnits are hertz (a clock limit), which must not turn the CPU count into anything else."""
    d = parse_ovf(real("cot-vmware-ovf/vmware.ovf").read_bytes())
    assert d.version == "1.0"
    assert [(f.file_id, f.href, f.size) for f in d.files] == [("file1", "input.vmdk", 152576)]
    (disk,) = d.disks
    assert (disk.disk_id, disk.capacity, disk.subformat) == ("vmdisk1", GiB, "streamOptimized")
    assert disk.file is not None
    assert disk.file.size == real("cot-vmware-ovf/input.vmdk").stat().st_size
    assert d.name == "vmw"
    assert d.os_type == "Red Hat Enterprise Linux 6 (64-bit)"  # vmw:osType is VMware's, not ovf:osType
    assert (d.cpus, d.memory_mib) == (2, 1536)


def test_real_forklift_ova_monolithic_sparse() -> None:
    data, sizes = ova_member("forklift-handmade-ovf-monolithicsparse.ova", ".ovf")
    d = parse_ovf(data)
    assert d.version == "1.0"  # no ovf:version attribute at all: the namespace says it
    (disk,) = d.disks
    assert disk.file is not None
    assert disk.file.href == "2nd_disk.vmdk"
    assert disk.file.size == sizes["2nd_disk.vmdk"] == 196608
    assert (disk.disk_id, disk.capacity) == ("vmdisk1", GiB)
    assert disk.subformat == "monolithicSparse"  # N7: not streamOptimized, as exporters write
    # ovf:id and <Name> differ here: the id wins, as documented.
    assert (d.name, d.os_type, d.cpus, d.memory_mib) == ("vm-2nd-disk", "Other Linux (64-bit)", 1, 2048)


def test_real_glance_ova_placeholder_disk() -> None:
    """N8: a genuine VirtualBox OVF 1.0 that claims an 8 GiB streamOptimized disk, stored as 4 bytes.
    The descriptor parses; catching the mismatch is the VMDK decoder's job, not this parser's."""
    data, sizes = ova_member("glance-virtualbox-ovf-placeholder-disk.ova", ".ovf")
    d = parse_ovf(data)
    (disk,) = d.disks
    assert disk.disk_id == "vmdisk2"
    assert disk.file is not None
    assert (disk.file.href, disk.file.size) == ("testserver-disk1.vmdk", None)
    assert sizes[disk.file.href] == 4
    assert (disk.capacity, disk.subformat) == (8 * GiB, "streamOptimized")
    assert (d.name, d.os_type, d.cpus, d.memory_mib) == ("testserver", "Ubuntu_64", 1, 512)


@pytest.mark.parametrize(
    "ova", ["forklift-handmade-ovf-monolithicsparse.ova", "glance-virtualbox-ovf-placeholder-disk.ova"]
)
def test_real_ova_member_names_match_hrefs(ova: str) -> None:
    data, sizes = ova_member(ova, ".ovf")
    names = {check_member_name(name) for name in sizes}
    assert {f.href for f in parse_ovf(data).files} <= names


def test_real_manifest_verifies_the_export() -> None:
    folder = "virtualbox-ovf20-export"
    m = parse_manifest(real(f"{folder}/ubuntu.2.0.mf").read_bytes())
    assert m.warnings == ()
    assert sorted(m.entries) == ["ubuntu.2.0-disk1.vmdk", "ubuntu.2.0.ovf"]
    for name, entry in m.entries.items():
        assert entry.algorithm == "sha256"
        data = real(f"{folder}/{name}").read_bytes()
        digester = Digester(entry)
        view = memoryview(data)
        for at in range(0, len(data), 4097):  # odd pieces, as a tar stream hands them over
            digester.update(view[at : at + 4097])
        digester.verify()
        tampered = Digester(entry)
        tampered.update(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(CorruptImage, match=f"manifest: {name} has sha256 "):
            tampered.verify()


# ---------------------------------------------------------------- hostile XML

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><Name>&lol9;</Name></Envelope>
"""


def test_billion_laughs_refused_before_expanding() -> None:
    start = time.monotonic()
    message = refused(UnsafeImage, BILLION_LAUGHS, "OVF descriptor:", "DTD", "'Envelope'")
    assert time.monotonic() - start < 1.0  # 10^9 "lol"s would take far longer (and 3 GB)
    assert "lol" not in message


def test_external_entity_refused_and_not_read() -> None:
    data = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><Name>&xxe;</Name></Envelope>"""
    message = refused(UnsafeImage, data, "DTD")
    assert "root:" not in message


def test_external_dtd_refused() -> None:
    data = (
        b'<!DOCTYPE Envelope SYSTEM "http://evil.example/ovf.dtd"><Envelope xmlns="' + OVF1.encode() + b'"/>'
    )
    refused(UnsafeImage, data, "DTD")


def test_plain_doctype_refused() -> None:
    refused(UnsafeImage, b"<!DOCTYPE Envelope>" + envelope(""), "has a DTD")


def test_undeclared_entity_is_corrupt() -> None:
    refused(CorruptImage, envelope("<Name>&nbsp;</Name>"), "OVF descriptor: not well-formed XML", "undefined")


@pytest.mark.parametrize(
    "data",
    [b"", b"<Envelope", b"<Envelope xmlns='x'><a></b></Envelope>", b"\xff\xfe<\x00", b"not xml at all"],
)
def test_malformed_xml_is_corrupt(data: bytes) -> None:
    refused(CorruptImage, data, "OVF descriptor: not well-formed XML")


def test_descriptor_size_cap() -> None:
    big = envelope(" " * (MAX_DESCRIPTOR - len(envelope("")) + 1))
    assert len(big) == MAX_DESCRIPTOR + 1
    refused(UnsafeImage, big, f"{MAX_DESCRIPTOR + 1} bytes", "limit")
    at_limit = envelope(" " * (MAX_DESCRIPTOR - len(envelope(""))))
    assert len(at_limit) == MAX_DESCRIPTOR
    assert parse_ovf(at_limit).disks == ()


def test_root_must_be_an_ovf_envelope() -> None:
    refused(CorruptImage, b'<Foo xmlns="' + OVF1.encode() + b'"/>', "not an OVF Envelope")
    refused(UnsupportedImage, b'<Envelope xmlns="http://www.vmware.com/schema/ovf/1/envelope"/>', "namespace")
    refused(UnsupportedImage, b"<Envelope/>", "namespace ''")


# ---------------------------------------------------------------- member names and hrefs

ESCAPING = [
    ("../x", "'..'"),
    ("/etc/passwd", "absolute"),
    ("a/../../b", "'..'"),
    ("a/..", "'..'"),
    ("a\\..\\..\\b", "'..'"),
    ("C:\\x", "drive letter"),
    ("c:x.vmdk", "drive letter"),
    ("\\x", "absolute Windows"),
    ("\\\\server\\share\\x.vmdk", "absolute Windows"),
    ("http://evil/x", "URL"),
    ("file:///etc/passwd", "URL"),
    ("HTTPS://evil/x", "URL"),
    ("a\0b", "NUL"),
    ("x\n/../../etc/passwd", "'..'"),
    ("", "empty"),
]


@pytest.mark.parametrize(("name", "reason"), ESCAPING)
def test_member_name_refused(name: str, reason: str) -> None:
    with pytest.raises(UnsafeImage, match=reason) as info:
        check_member_name(name)
    assert "\n" not in str(info.value)
    assert "\0" not in str(info.value)


@pytest.mark.parametrize(("name", "reason"), [e for e in ESCAPING if e[0] and "\0" not in e[0]])
def test_href_refused(name: str, reason: str) -> None:
    escaped = name.replace("&", "&amp;").replace('"', "&quot;")
    data = one_disk('ovf:fileRef="file1" ovf:capacity="1"', f'ovf:id="file1" ovf:href="{escaped}"')
    refused(UnsafeImage, data, reason)


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("disk.vmdk", "disk.vmdk"),
        ("./disk.vmdk", "disk.vmdk"),
        ("././disk.vmdk", "disk.vmdk"),
        ("dir//./disk.vmdk", "dir/disk.vmdk"),
        ("dir/", "dir"),
        ("./", "."),
        ("a..b.vmdk", "a..b.vmdk"),  # dots inside a name are not a parent reference
        ("...", "..."),
        ("%2e%2e/x", "%2e%2e/x"),  # not percent-decoded: a literal name, compared literally
    ],
)
def test_member_name_normalised(name: str, normal: str) -> None:
    assert check_member_name(name) == normal


def test_href_normalised_and_package_root_is_no_file() -> None:
    d = parse_ovf(one_disk('ovf:fileRef="file1" ovf:capacity="1"', 'ovf:id="file1" ovf:href="./d/x.vmdk"'))
    assert d.files[0].href == "d/x.vmdk"
    refused(CorruptImage, one_disk('ovf:capacity="1"', 'ovf:id="file1" ovf:href="./"'), "names no file")


def test_duplicate_hrefs_refused() -> None:
    refs = '<File ovf:id="f1" ovf:href="disk.vmdk"/><File ovf:id="f2" ovf:href="./disk.vmdk"/>'
    refused(CorruptImage, envelope(f"<References>{refs}</References>"), "two Files", "'disk.vmdk'")


def test_duplicate_file_and_disk_ids_refused() -> None:
    refs = '<File ovf:id="f1" ovf:href="a.vmdk"/><File ovf:id="f1" ovf:href="b.vmdk"/>'
    refused(CorruptImage, envelope(f"<References>{refs}</References>"), "ovf:id 'f1'")
    disks = '<Disk ovf:diskId="d" ovf:capacity="1"/><Disk ovf:diskId="d" ovf:capacity="2"/>'
    refused(CorruptImage, envelope(f"<DiskSection>{disks}</DiskSection>"), "ovf:diskId 'd'")


def test_file_without_href_or_id_refused() -> None:
    refused(CorruptImage, envelope('<References><File ovf:id="f1"/></References>'), "no ovf:href")
    refused(CorruptImage, envelope('<References><File ovf:href="a"/></References>'), "no ovf:id")


# ---------------------------------------------------------------- files and disks


def test_no_disk_section_is_no_disks() -> None:
    d = parse_ovf(envelope('<References><File ovf:id="f" ovf:href="readme.txt" ovf:size="12"/></References>'))
    assert d.disks == ()
    assert [(f.href, f.size) for f in d.files] == [("readme.txt", 12)]
    assert d.to_json()["disks"] == []
    assert (d.name, d.os_type, d.cpus, d.memory_mib) == (None, None, None, None)


def test_disk_without_file_ref_is_blank() -> None:
    d = parse_ovf(one_disk('ovf:capacity="10" ovf:capacityAllocationUnits="byte * 2^30"'))
    (disk,) = d.disks
    assert (disk.file, disk.capacity, disk.format, disk.subformat) == (None, 10 * GiB, None, None)
    assert d.to_json()["disks"] == [{"disk_id": "d1", "href": None, "capacity": 10 * GiB, "format": None}]


def test_disk_referencing_missing_file_refused() -> None:
    refused(CorruptImage, one_disk('ovf:fileRef="nope" ovf:capacity="1"'), "Disk 'd1'", "'nope'", "no File")


def test_disk_without_capacity_or_id_refused() -> None:
    refused(CorruptImage, one_disk('ovf:fileRef="file1"'), "no ovf:capacity")
    refused(CorruptImage, envelope('<DiskSection><Disk ovf:capacity="1"/></DiskSection>'), "no ovf:diskId")


def test_delta_disk_refused() -> None:
    disks = (
        '<Disk ovf:diskId="base" ovf:capacity="1"/>'
        '<Disk ovf:diskId="top" ovf:capacity="1" ovf:parentRef="base"/>'
    )
    refused(UnsupportedImage, envelope(f"<DiskSection>{disks}</DiskSection>"), "'top'", "parentRef")


def test_disks_keep_disk_section_order() -> None:
    refs = '<File ovf:id="a" ovf:href="a.vmdk"/><File ovf:id="b" ovf:href="b.vmdk"/>'
    disks = (
        '<Disk ovf:diskId="second" ovf:fileRef="b" ovf:capacity="2"'
        f' ovf:format="{VMDK_URI}#monolithicSparse"/>'
        '<Disk ovf:diskId="first" ovf:fileRef="a" ovf:capacity="1" ovf:format="http://example/raw"/>'
    )
    d = parse_ovf(envelope(f"<References>{refs}</References><DiskSection>{disks}</DiskSection>"))
    assert [(x.disk_id, x.file.href if x.file else None, x.subformat) for x in d.disks] == [
        ("second", "b.vmdk", "monolithicSparse"),
        ("first", "a.vmdk", None),
    ]


@pytest.mark.parametrize(
    ("capacity", "units", "expected"),
    [
        ("5", None, 5),
        ("7", "byte", 7),
        ("1", "byte * 2^30", GiB),
        ("2", "byte*2^20", 2 * MiB),
        ("3", "  byte  *  2^10 ", 3 * 1024),
        ("3", "MegaBytes", 3 * MiB),  # VirtualBox's CIM name, meaning 2^20
        ("1", "GigaBytes", GiB),
        ("1", "KiloBytes", 1024),
        ("4", "byte * 10^3", 4000),
        ("1", "kilobyte", 1000),  # DSP0004 prefixes: kilo is 10^3, kibi 2^10
        ("1", "mebibyte", MiB),
        ("1", "byte * 1024 * 2^10", MiB),
        ("0", "byte * 2^30", 0),
        ("1", "Byte * 2^63", 1 << 63),
    ],
)
def test_capacity_units(capacity: str, units: str | None, expected: int) -> None:
    attrs = f'ovf:capacity="{capacity}"' + (f' ovf:capacityAllocationUnits="{units}"' if units else "")
    assert parse_ovf(one_disk(attrs)).disks[0].capacity == expected


@pytest.mark.parametrize(
    ("capacity", "units", "reason"),
    [
        ("2", "byte * 2^63", "over 2^63"),
        ("9" * 30, "byte", "over 2^63"),
        ("1", "byte * 2^65", "not a unit of bytes"),  # exponents are bounded before computing
        ("1" + "0" * 40, "byte", "not a whole number"),  # over 30 digits: not even converted
    ],
)
def test_capacity_over_2_63_refused(capacity: str, units: str, reason: str) -> None:
    attrs = f'ovf:capacity="{capacity}" ovf:capacityAllocationUnits="{units}"'
    refused(CorruptImage, one_disk(attrs), "Disk 'd1'", reason)


@pytest.mark.parametrize(
    "units", ["hertz * 10^6", "byte / 8", "byte * 2^99999", "byte * byte", "2^30", "byte * 0", "furlongs"]
)
def test_capacity_units_refused(units: str) -> None:
    refused(
        CorruptImage,
        one_disk(f'ovf:capacity="1" ovf:capacityAllocationUnits="{units}"'),
        "not a unit of bytes",
    )
    assert byte_multiplier(units) is None


@pytest.mark.parametrize("capacity", ["-1", "1.5", "0x10", "1_000", "+1", "1e9", "９"])
def test_capacity_must_be_digits(capacity: str) -> None:
    refused(CorruptImage, one_disk(f'ovf:capacity="{capacity}"'), "not a whole number")


def test_capacity_from_product_property() -> None:
    """OVF lets ovf:capacity name a ProductSection property, chosen at deployment."""
    system = (
        '<VirtualSystem ovf:id="vm"><ProductSection><Info>p</Info>'
        '<Property ovf:key="disk_gb" ovf:type="uint" ovf:value="20"/></ProductSection></VirtualSystem>'
    )
    disk = (
        '<DiskSection><Disk ovf:diskId="d" ovf:capacity="${disk_gb}"'
        ' ovf:capacityAllocationUnits="byte * 2^30"/>'
    )
    assert parse_ovf(envelope(disk + "</DiskSection>", system=system)).disks[0].capacity == 20 * GiB
    refused(CorruptImage, envelope(disk + "</DiskSection>"), "'${disk_gb}'", "no property")


def test_chunked_file_refused() -> None:
    data = one_disk(
        'ovf:fileRef="file1" ovf:capacity="1"', 'ovf:id="file1" ovf:href="d.vmdk" ovf:chunkSize="2147483648"'
    )
    refused(UnsupportedImage, data, "File 'file1'", "chunkSize")


@pytest.mark.parametrize(("value", "expected"), [("gzip", "gzip"), ("identity", None), (None, None)])
def test_file_compression(value: str | None, expected: str | None) -> None:
    extra = f' ovf:compression="{value}"' if value else ""
    d = parse_ovf(
        one_disk('ovf:fileRef="file1" ovf:capacity="1"', f'ovf:id="file1" ovf:href="d.vmdk"{extra}')
    )
    assert d.files[0].compression == expected
    assert d.disks[0].file is d.files[0]


def test_file_compression_other_than_gzip_refused() -> None:
    data = one_disk('ovf:capacity="1"', 'ovf:id="file1" ovf:href="d.vmdk" ovf:compression="bzip2"')
    refused(UnsupportedImage, data, "'bzip2'")


def test_file_size_must_be_digits() -> None:
    refused(
        CorruptImage,
        one_disk('ovf:capacity="1"', 'ovf:id="file1" ovf:href="d" ovf:size="-5"'),
        "ovf:size '-5'",
    )


def test_ovf2_prefixed_and_unqualified_attributes() -> None:
    """Namespaces matter, prefixes do not: an 'x:' prefix on OVF 2.0, and attributes without one."""
    data = (
        f'<x:Envelope xmlns:x="{OVF2}"><x:References><x:File id="f" href="d.vmdk" size="3"/></x:References>'
        '<x:DiskSection><x:Disk diskId="d" fileRef="f" capacity="4" capacityAllocationUnits="byte * 2^20"/>'
        "</x:DiskSection></x:Envelope>"
    ).encode()
    d = parse_ovf(data)
    assert d.version == "2.0"
    assert (d.disks[0].capacity, d.disks[0].file) == (4 * MiB, d.files[0])
    assert d.files[0].size == 3


# ---------------------------------------------------------------- the VM summary


def hardware(*items: str, os: str = "") -> str:
    """A VirtualSystem 'vm1' with these <Item>s and OperatingSystemSection."""
    return (
        f'<VirtualSystem ovf:id="vm1"><Info>x</Info>{os}<VirtualHardwareSection><Info>h</Info>'
        + "".join(items)
        + "</VirtualHardwareSection></VirtualSystem>"
    )


def item(kind: int, quantity: str, units: str | None = None, attrs: str = "") -> str:
    text = f"<rasd:ResourceType>{kind}</rasd:ResourceType>"
    text += f"<rasd:VirtualQuantity>{quantity}</rasd:VirtualQuantity>"
    if units:
        text += f"<rasd:AllocationUnits>{units}</rasd:AllocationUnits>"
    return f"<Item {attrs}>{text}</Item>"


@pytest.mark.parametrize(
    ("units", "quantity", "mib"),
    [(None, "1024", 1024), ("byte * 2^20", "64", 64), ("byte * 2^30", "2", 2048), ("GigaBytes", "4", 4096)],
)
def test_memory_units(units: str | None, quantity: str, mib: int) -> None:
    d = parse_ovf(envelope("", system=hardware(item(3, "4"), item(4, quantity, units))))
    assert (d.cpus, d.memory_mib) == (4, mib)


def test_unreadable_hardware_is_none_not_a_refusal() -> None:
    d = parse_ovf(envelope("", system=hardware(item(3, "lots"), item(4, "512", "hertz"))))
    assert (d.name, d.cpus, d.memory_mib) == ("vm1", None, None)


def test_os_type_preference() -> None:
    os = '<OperatingSystemSection ovf:id="36" ovf:osType="{t}"><Info>i</Info>{desc}</OperatingSystemSection>'
    with_type = os.format(t="rhel9_64Guest", desc="<Description>RHEL 9</Description>")
    assert parse_ovf(envelope("", system=hardware(os=with_type))).os_type == "rhel9_64Guest"
    described = os.format(t="", desc="<Description>RHEL 9</Description>")
    assert parse_ovf(envelope("", system=hardware(os=described))).os_type == "RHEL 9"
    bare = os.format(t="", desc="")
    assert parse_ovf(envelope("", system=hardware(os=bare))).os_type == "36"


def test_name_falls_back_to_name_element_and_collections() -> None:
    system = (
        '<VirtualSystemCollection ovf:id="vapp"><Info>c</Info>'
        "<VirtualSystem><Info>v</Info><Name>web</Name></VirtualSystem>"
        '<VirtualSystem ovf:id="db"><Info>v</Info></VirtualSystem></VirtualSystemCollection>'
    )
    assert parse_ovf(envelope("", system=system)).name == "web"  # the first system, by its <Name>


def test_deployment_option_default_configuration() -> None:
    options = (
        "<DeploymentOptionSection><Info>o</Info>"
        '<Configuration ovf:id="small"><Label>S</Label></Configuration>'
        '<Configuration ovf:id="large" ovf:default="true"><Label>L</Label></Configuration>'
        "</DeploymentOptionSection>"
    )
    system = hardware(
        item(3, "2", attrs='ovf:configuration="small"'),
        item(3, "8", attrs='ovf:configuration="large"'),
        item(4, "16", "byte * 2^30", attrs='ovf:configuration="small large"'),
    )
    d = parse_ovf(envelope(options, system=system))
    assert (d.cpus, d.memory_mib) == (8, 16 * 1024)  # "large" is the default, not the first
    no_default = options.replace(' ovf:default="true"', "")
    d = parse_ovf(envelope(no_default, system=system))
    assert (d.cpus, d.memory_mib) == (2, 16 * 1024)  # without one, the first Configuration is


# ---------------------------------------------------------------- manifests

SHA256_A = hashlib.sha256(b"a").hexdigest()
SHA1_B = hashlib.sha1(b"b").hexdigest()
SHA512_C = hashlib.sha512(b"c").hexdigest()


def test_manifest_good_lines() -> None:
    data = (
        f"SHA256(disk.vmdk)= {SHA256_A}\n"
        f"SHA1(x.ovf)={SHA1_B.upper()}\n"
        f"sha512 (./dir/c.iso) =  {SHA512_C}  \n"
        f"SHA256(with (parens).vmdk)= {SHA256_A}\n"
        "\n"
    ).encode()
    m = parse_manifest(data)
    assert m.warnings == ()
    assert m.entries == {
        "disk.vmdk": ManifestEntry("disk.vmdk", "sha256", SHA256_A),
        "x.ovf": ManifestEntry("x.ovf", "sha1", SHA1_B),
        "dir/c.iso": ManifestEntry("dir/c.iso", "sha512", SHA512_C),
        "with (parens).vmdk": ManifestEntry("with (parens).vmdk", "sha256", SHA256_A),
    }


def test_manifest_crlf_and_bom() -> None:
    m = parse_manifest(f"\ufeffSHA256(a.vmdk)= {SHA256_A}\r\nSHA1(b.ovf)= {SHA1_B}\r\n".encode())
    assert m.warnings == ()
    assert [(e.name, e.digest) for e in m.entries.values()] == [("a.vmdk", SHA256_A), ("b.ovf", SHA1_B)]


def test_manifest_bad_lines_are_warnings() -> None:
    data = (
        b"garbage\n"
        + f"MD5(a.vmdk)= {hashlib.md5(b'a').hexdigest()}\n".encode()
        + b"SHA256(\xff.vmdk)= 00\n"
        + b"\n   \n"
        + f"SHA256(a.vmdk)= {SHA256_A}\n".encode()
        + b"SHA256 a.vmdk\n"
    )
    m = parse_manifest(data)
    assert list(m.entries) == ["a.vmdk"]
    assert len(m.warnings) == 4
    assert m.warnings[0].startswith("manifest line 1: not 'ALGORITHM(name)= digest'")
    assert m.warnings[1].startswith("manifest line 2: MD5 is not checked")
    assert m.warnings[2].startswith("manifest line 3: not UTF-8")
    assert "\\xff" in m.warnings[2]
    assert m.warnings[3].startswith("manifest line 7:")
    assert all("\n" not in w for w in m.warnings)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (f"SHA1(a)= {SHA256_A}", ("SHA1(a)", "not 40 hex digits")),
        (f"SHA256(a)= {SHA1_B}", ("SHA256(a)", "not 64 hex digits")),
        (f"SHA512(a)= {SHA256_A}", ("not 128 hex digits",)),
        (f"SHA256(a)= {SHA256_A[:-1]}g", ("not 64 hex digits",)),
        ("SHA256(a)=", ("not 64 hex digits",)),
    ],
)
def test_manifest_digest_length_checked(line: str, words: tuple[str, ...]) -> None:
    with pytest.raises(CorruptImage) as info:
        parse_manifest(line.encode())
    for word in words:
        assert word in str(info.value)


def test_manifest_name_twice() -> None:
    same = f"SHA256(a.vmdk)= {SHA256_A}\nSHA256(./a.vmdk)= {SHA256_A.upper()}\n".encode()
    assert len(parse_manifest(same).entries) == 1
    other = hashlib.sha256(b"z").hexdigest()
    with pytest.raises(CorruptImage, match=r"'a\.vmdk' is listed twice with different digests"):
        parse_manifest(f"SHA256(a.vmdk)= {SHA256_A}\nSHA256(a.vmdk)= {other}\n".encode())
    with pytest.raises(CorruptImage, match="listed twice"):
        parse_manifest(f"SHA256(a.vmdk)= {SHA256_A}\nSHA1(a.vmdk)= {SHA1_B}\n".encode())


@pytest.mark.parametrize("name", ["../a.vmdk", "/etc/passwd", "C:\\a", "http://evil/a"])
def test_manifest_escaping_name_refused(name: str) -> None:
    with pytest.raises(UnsafeImage):
        parse_manifest(f"SHA256({name})= {SHA256_A}\n".encode())


def test_manifest_size_cap() -> None:
    line = f"SHA256(a.vmdk)= {SHA256_A}\n".encode()
    data = line * (MAX_MANIFEST // len(line)) + b"\n" * (MAX_MANIFEST % len(line))
    assert len(data) == MAX_MANIFEST
    assert len(parse_manifest(data).entries) == 1
    with pytest.raises(UnsafeImage, match=f"{MAX_MANIFEST + 1} bytes"):
        parse_manifest(data + b"\n")


@pytest.mark.parametrize(
    ("algorithm", "digest"), [("sha1", SHA1_B), ("sha256", hashlib.sha256(b"b").hexdigest())]
)
def test_digester_match_and_mismatch(algorithm: str, digest: str) -> None:
    good = Digester(ManifestEntry("b.vmdk", algorithm, digest))
    good.update(b"")
    good.update(memoryview(bytearray(b"b")))
    good.verify()
    bad = Digester(ManifestEntry("b.vmdk", algorithm, digest))
    bad.update(b"c")
    got = hashlib.new(algorithm, b"c").hexdigest()
    with pytest.raises(CorruptImage) as info:
        bad.verify()
    assert str(info.value) == (
        f"manifest: b.vmdk has {algorithm} {got[:16]}..., the manifest says {digest[:16]}..."
    )
