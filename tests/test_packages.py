"""Packages: OVA (tar with an OVF descriptor, manifest and disks), a loose OVF, UEC tarballs with their
kernel and ramdisk, a disk in a tar.xz, and a bare kernel or initramfs as SRC.

Every fixture is built here with tar, xz, gzip and qemu-img from known raw disks, converted from a file,
over HTTP and from S3, and each output is checked with qemu-img check and compare against the disk it
was made from (a kernel or ramdisk byte for byte against its member).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from servers import RangeHTTPServer, S3Store

from tests.helpers import (
    MiB,
    error_line,
    imgpipe,
    leftovers,
    pattern_disk,
    qemu_check,
    qemu_compare,
    summary_of,
)

D1_SIZE = 12 * MiB + 4096  # not a whole number of chunks or clusters
D2_SIZE = 5 * MiB
VMDK_STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
QCOW2_URI = "https://www.qemu.org/qcow2"


def _ovf(disks: list[tuple[str, str, str, int, str]], name: str = "testvm") -> bytes:
    """An OVF 1.0 descriptor: disks as (disk id, file id, href, capacity, format URI)."""
    files = "".join(f'<File ovf:id="{fid}" ovf:href="{href}"/>' for _, fid, href, _, _ in disks)
    section = "".join(
        f'<Disk ovf:diskId="{did}" ovf:fileRef="{fid}" ovf:capacity="{cap}" ovf:format="{fmt}"/>'
        for did, fid, _, cap, fmt in disks
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References>{files}</References>
 <DiskSection><Info>Virtual disks</Info>{section}</DiskSection>
 <VirtualSystem ovf:id="{name}"><Info>A VM</Info><Name>{name}</Name>
  <OperatingSystemSection ovf:id="94" ovf:osType="ubuntu64Guest"><Info>OS</Info></OperatingSystemSection>
  <VirtualHardwareSection><Info>Hardware</Info>
   <Item><rasd:ElementName>2 CPUs</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
    <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
   <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>RAM</rasd:ElementName>
    <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
    <rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
  </VirtualHardwareSection>
 </VirtualSystem>
</Envelope>
""".encode()


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _qemu(src: Path, dst: Path, *opts: str) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", *opts, str(src), str(dst)], check=True)
    return dst.read_bytes()


def _fake_bzimage(size: int = 300_000) -> bytes:
    """The bytes a probe checks in an x86 Linux boot image (boot flag, "HdrS"), in random-ish data."""
    k = bytearray(hashlib.shake_256(b"kernel").digest(size))
    k[0x1FE:0x200] = b"\x55\xaa"
    k[0x202:0x206] = b"HdrS"
    return bytes(k)


def _initramfs() -> bytes:
    entry = b"070701" + b"0" * 104 + b"TRAILER!!!\x00"
    return gzip.compress(entry + bytes(512 - len(entry) % 512) + b"early userspace" * 200)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("packages")
    d1 = pattern_disk(d / "d1.raw", D1_SIZE, seed=7)
    d2 = pattern_disk(d / "d2.raw", D2_SIZE, seed=8)
    v1 = _qemu(d1, d / "v1.vmdk", "vmdk", "-o", "subformat=streamOptimized")
    v2 = _qemu(d2, d / "v2.vmdk", "vmdk", "-o", "subformat=streamOptimized")
    q2 = _qemu(d2, d / "q2.qcow2", "qcow2")
    one_ovf = _ovf([("vmdisk1", "file1", "one-disk1.vmdk", D1_SIZE, VMDK_STREAM)])
    two_ovf = _ovf(
        [
            ("system", "file1", "two-disk1.vmdk", D1_SIZE, VMDK_STREAM),
            ("data", "file2", "two-disk2.qcow2", D2_SIZE, QCOW2_URI),
        ]
    )
    mf = (
        f"SHA256(two.ovf)= {hashlib.sha256(two_ovf).hexdigest()}\n"
        f"SHA1(two-disk1.vmdk)= {hashlib.sha1(v1).hexdigest()}\n"
        f"SHA256(two-disk2.qcow2)= {hashlib.sha256(q2).hexdigest()}\n"
    ).encode()
    lie = mf.replace(hashlib.sha256(q2).hexdigest().encode(), hashlib.sha256(b"other").hexdigest().encode())
    late_ovf = _ovf([("vmdisk1", "file1", "late-disk1.vmdk", D2_SIZE, VMDK_STREAM)])
    late_mf = f"SHA256(late-disk1.vmdk)= {hashlib.sha256(v2).hexdigest()}\n".encode()
    kernel, ramdisk = _fake_bzimage(), _initramfs()
    out: dict[str, Any] = {"d1": d1, "d2": d2, "kernel_bytes": kernel, "ramdisk_bytes": ramdisk}
    out["one.ova"] = _tar(d / "one.ova", [("one.ovf", one_ovf), ("one-disk1.vmdk", v1)])
    out["two.ova"] = _tar(
        d / "two.ova",
        [("two.ovf", two_ovf), ("two.mf", mf), ("two-disk1.vmdk", v1), ("two-disk2.qcow2", q2)],
        tarfile.PAX_FORMAT,
    )
    out["lying.ova"] = _tar(
        d / "lying.ova",
        [("two.ovf", two_ovf), ("two.mf", lie), ("two-disk1.vmdk", v1), ("two-disk2.qcow2", q2)],
    )
    out["escape.ova"] = _tar(d / "escape.ova", [("one.ovf", one_ovf), ("../one-disk1.vmdk", v1)])
    # The descriptor is not first: a (small) disk and the manifest come before it.
    out["late.ova"] = _tar(
        d / "late.ova",
        [("late-disk1.vmdk", v2), ("late.mf", late_mf), ("late.ovf", late_ovf)],
        tarfile.GNU_FORMAT,
    )
    uec = d / "uec"
    uec.mkdir()
    shutil.copy(d1, uec / "precise-server-cloudimg-amd64.img")
    (uec / "precise-server-cloudimg-amd64-vmlinuz-virtual").write_bytes(kernel)
    (uec / "precise-server-cloudimg-amd64-initrd-virtual").write_bytes(ramdisk)
    (uec / "README.files").write_text("what is in this tarball\n")
    subprocess.run(
        f"tar -C {uec} -czf {d}/uec.tar.gz precise-server-cloudimg-amd64.img "
        "precise-server-cloudimg-amd64-vmlinuz-virtual precise-server-cloudimg-amd64-initrd-virtual "
        "README.files",
        shell=True,
        check=True,
    )
    out["uec.tar.gz"] = d / "uec.tar.gz"
    gce = d / "gce"
    gce.mkdir()
    shutil.copy(d2, gce / "disk.raw")
    subprocess.run(f"tar -C {gce} -cf - disk.raw | xz -T2 -3 > {d}/disk.tar.xz", shell=True, check=True)
    out["disk.tar.xz"] = d / "disk.tar.xz"
    (d / "vmlinuz").write_bytes(kernel)
    out["vmlinuz"] = d / "vmlinuz"
    (d / "initrd.img").write_bytes(ramdisk)
    out["initrd.img"] = d / "initrd.img"
    # A loose OVF package: descriptor, manifest and disk as separate files (objects).
    loose = d / "loose"
    loose.mkdir()
    (loose / "vm.ovf").write_bytes(_ovf([("vmdisk1", "file1", "vm-disk1.vmdk", D1_SIZE, VMDK_STREAM)]))
    (loose / "vm-disk1.vmdk").write_bytes(v1)
    (loose / "vm.mf").write_bytes(
        f"SHA256(vm.ovf)= {hashlib.sha256((loose / 'vm.ovf').read_bytes()).hexdigest()}\n"
        f"SHA256(vm-disk1.vmdk)= {hashlib.sha256(v1).hexdigest()}\n".encode()
    )
    out["loose"] = loose
    return out


# What each package holds: (output name under DST's prefix, what it must equal, kind).
EXPECT: dict[str, list[tuple[str, str, str]]] = {
    "one.ova": [("vmdisk1.qcow2", "d1", "disk")],
    "two.ova": [("system.qcow2", "d1", "disk"), ("data.qcow2", "d2", "disk")],
    "late.ova": [("vmdisk1.qcow2", "d2", "disk")],
    "uec.tar.gz": [
        ("precise-server-cloudimg-amd64.qcow2", "d1", "disk"),
        ("precise-server-cloudimg-amd64-vmlinuz-virtual", "kernel_bytes", "kernel"),
        ("precise-server-cloudimg-amd64-initrd-virtual", "ramdisk_bytes", "ramdisk"),
    ],
    "disk.tar.xz": [("disk.qcow2", "d2", "disk")],
}


def _check_outputs(made: dict[str, Any], name: str, out_dir: Path, summary: dict[str, Any]) -> None:
    want = EXPECT[name]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(w[0] for w in want)
    assert [o["kind"] for o in summary["outputs"]] == [w[2] for w in want]
    for (fname, ref, kind), out in zip(want, summary["outputs"], strict=True):
        path = out_dir / fname
        assert out["destination"].endswith(fname)
        assert out["output_size"] == path.stat().st_size
        if kind == "disk":
            qemu_check(path)
            qemu_compare(made[ref], path)
            assert out["virtual_size"] == made[ref].stat().st_size
        else:
            assert path.read_bytes() == made[ref]
        assert len(out["sha256"]) == 64


@pytest.mark.parametrize("name", list(EXPECT))
def test_package_from_file(tmp_path: Path, made: dict[str, Any], name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    s = summary_of(imgpipe("convert", str(made[name]), f"{out}/", "--json"))
    _check_outputs(made, name, out, s)
    assert s["package"] == ("ova" if name.endswith(".ova") else "tarball")


@pytest.mark.parametrize("name", list(EXPECT))
def test_package_from_http(tmp_path: Path, made: dict[str, Any], http: RangeHTTPServer, name: str) -> None:
    shutil.copy(made[name], tmp_path / "www" / name)
    out = tmp_path / "out"
    out.mkdir()
    s = summary_of(imgpipe("convert", http.url(f"/{name}"), f"{out}/", "--json"))
    _check_outputs(made, name, out, s)
    # One pass over the archive: no member is read twice.
    assert http.bytes_sent() <= made[name].stat().st_size + 64 * 1024


@pytest.mark.parametrize("name", list(EXPECT))
def test_package_from_s3_to_s3(
    tmp_path: Path, made: dict[str, Any], store: S3Store, bucket: str, name: str
) -> None:
    c = store.client()
    c.upload_file(str(made[name]), bucket, f"in/{name}")
    s = summary_of(
        imgpipe("convert", f"s3://{bucket}/in/{name}", f"s3://{bucket}/out/", "--json", env=store.env({}))
    )
    out = tmp_path / "out"
    out.mkdir()
    for fname, _, kind in EXPECT[name]:
        c.download_file(bucket, f"out/{fname}", str(out / fname))
        meta = c.head_object(Bucket=bucket, Key=f"out/{fname}")["Metadata"]
        assert meta["imgpipe-kind"] == kind
    _check_outputs(made, name, out, s)
    assert not c.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_ova_summary_says_what_the_ovf_said(tmp_path: Path, made: dict[str, Any]) -> None:
    s = summary_of(imgpipe("convert", str(made["two.ova"]), f"{tmp_path}/{{index}}-{{disk}}.qcow2", "--json"))
    assert [o["destination"] for o in s["outputs"]] == [
        f"{tmp_path}/1-system.qcow2",
        f"{tmp_path}/2-data.qcow2",
    ]
    assert [(o["disk_id"], o["index"], o["source_format"]) for o in s["outputs"]] == [
        ("system", 1, "vmdk"),
        ("data", 2, "qcow2"),
    ]
    ovf = s["ovf"]
    assert (ovf["name"], ovf["cpus"], ovf["memory_mib"]) == ("testvm", 2, 2048)
    assert ovf["os_type"]
    assert [d["capacity"] for d in ovf["disks"]] == [D1_SIZE, D2_SIZE]
    assert s["manifest"].startswith("verified")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1-system.qcow2", "2-data.qcow2"]


def test_disk_option_picks_one(tmp_path: Path, made: dict[str, Any]) -> None:
    dst = tmp_path / "only.qcow2"
    s = summary_of(imgpipe("convert", str(made["two.ova"]), str(dst), "--disk", "2", "--json"))
    assert [o["disk_id"] for o in s["outputs"]] == ["data"]
    qemu_compare(made["d2"], dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.qcow2"]
    p = imgpipe("convert", str(made["two.ova"]), str(dst), "--disk", "3")
    assert p.returncode == 2
    assert "2 disk" in error_line(p)


def test_several_disks_need_a_template(tmp_path: Path, made: dict[str, Any]) -> None:
    p = imgpipe("convert", str(made["two.ova"]), str(tmp_path / "out.qcow2"))
    assert p.returncode == 2
    assert "{disk}" in error_line(p)
    assert "--disk" in error_line(p)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("lying.ova", 3, "manifest: two-disk2.qcow2 has sha256"),
        ("escape.ova", 3, "../one-disk1.vmdk"),
    ],
)
def test_bad_packages_are_refused(
    tmp_path: Path, made: dict[str, Any], name: str, status: int, words: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    p = imgpipe("convert", str(made[name]), f"{out}/")
    assert p.returncode == status, p.stderr.decode()[-800:]
    assert words in error_line(p)
    assert list(out.iterdir()) == []
    assert leftovers(out) == []


def test_lying_manifest_leaves_nothing_in_s3(made: dict[str, Any], store: S3Store, bucket: str) -> None:
    c = store.client()
    c.upload_file(str(made["lying.ova"]), bucket, "in/lying.ova")
    p = imgpipe("convert", f"s3://{bucket}/in/lying.ova", f"s3://{bucket}/out/", env=store.env({}))
    assert p.returncode == 3
    assert "manifest" in error_line(p)
    assert [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["in/lying.ova"]
    assert not c.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize(("name", "kind"), [("vmlinuz", "kernel"), ("initrd.img", "ramdisk")])
def test_bare_kernel_and_ramdisk_are_copied(
    tmp_path: Path, made: dict[str, Any], http: RangeHTTPServer, name: str, kind: str
) -> None:
    ref = made[f"{kind}_bytes"]
    dst = tmp_path / "copy"
    s = summary_of(imgpipe("convert", str(made[name]), str(dst), "--json"))
    assert (s["source_format"], s["output_format"]) == (kind, "raw")
    assert dst.read_bytes() == ref
    shutil.copy(made[name], tmp_path / "www" / name)
    dst.unlink()
    s = summary_of(imgpipe("convert", http.url(f"/{name}"), str(dst), "--json"))
    assert s["source_format"] == kind
    assert dst.read_bytes() == ref


def test_bare_kernel_from_s3_has_its_kind(made: dict[str, Any], store: S3Store, bucket: str) -> None:
    c = store.client()
    c.upload_file(str(made["vmlinuz"]), bucket, "in/vmlinuz")
    s = summary_of(
        imgpipe("convert", f"s3://{bucket}/in/vmlinuz", f"s3://{bucket}/out.aki", "--json", env=store.env({}))
    )
    assert s["source_format"] == "kernel"
    obj = c.get_object(Bucket=bucket, Key="out.aki")
    assert obj["Body"].read() == made["kernel_bytes"]
    assert obj["Metadata"]["imgpipe-kind"] == "kernel"


def test_loose_ovf_reads_its_disks_beside_it(
    tmp_path: Path, made: dict[str, Any], http: RangeHTTPServer
) -> None:
    for f in made["loose"].iterdir():
        shutil.copy(f, tmp_path / "www" / f.name)
    for src in (str(made["loose"] / "vm.ovf"), http.url("/vm.ovf")):
        dst = tmp_path / "vm.qcow2"
        s = summary_of(imgpipe("convert", src, str(dst), "--json"))
        assert s["manifest"].startswith("verified")
        assert [o["member"] for o in s["outputs"]] == ["vm-disk1.vmdk"]
        qemu_check(dst)
        qemu_compare(made["d1"], dst)
        dst.unlink()


def test_loose_ovf_from_s3_with_a_lying_manifest(made: dict[str, Any], store: S3Store, bucket: str) -> None:
    c = store.client()
    for f in made["loose"].iterdir():
        c.upload_file(str(f), bucket, f"pkg/{f.name}")
    s = summary_of(
        imgpipe(
            "convert", f"s3://{bucket}/pkg/vm.ovf", f"s3://{bucket}/vm.qcow2", "--json", env=store.env({})
        )
    )
    assert s["outputs"][0]["virtual_size"] == D1_SIZE
    c.put_object(Bucket=bucket, Key="pkg/vm.mf", Body=b"SHA256(vm-disk1.vmdk)= " + b"0" * 64 + b"\n")
    c.delete_object(Bucket=bucket, Key="vm.qcow2")
    p = imgpipe("convert", f"s3://{bucket}/pkg/vm.ovf", f"s3://{bucket}/vm.qcow2", env=store.env({}))
    assert p.returncode == 3
    assert "manifest" in error_line(p)
    assert "vm.qcow2" not in [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]


REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata" / "real"
real = pytest.mark.skipif(not REAL.is_dir(), reason="real images folder absent (CI has it)")


@real
def test_real_forklift_ova(tmp_path: Path) -> None:
    dst = tmp_path / "out.qcow2"
    ova = REAL / "forklift-handmade-ovf-monolithicsparse.ova"
    s = summary_of(imgpipe("convert", str(ova), str(dst), "--json"))
    assert s["outputs"][0]["virtual_size"] == 1 << 30
    qemu_check(dst)
    with tarfile.open(ova) as tf:
        tf.extract("2nd_disk.vmdk", tmp_path, filter="data")
    qemu_compare(tmp_path / "2nd_disk.vmdk", dst)


@real
@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("malformed-forklift-utf8-mangled-vmdk.ova", "text-mode transfer"),
        ("glance-virtualbox-ovf-placeholder-disk.ova", "but the file is raw"),
    ],
)
def test_real_broken_ovas_are_refused(tmp_path: Path, name: str, words: str) -> None:
    p = imgpipe("convert", str(REAL / name), str(tmp_path / "out.qcow2"))
    assert p.returncode == 3
    assert words in error_line(p)
    assert list(tmp_path.iterdir()) == []


@real
@pytest.mark.parametrize(
    ("ovf", "capacity", "manifest"),
    [
        ("virtualbox-ovf20-export/ubuntu.2.0.ovf", 8 << 30, "verified"),
        ("cot-vmware-ovf/vmware.ovf", 1 << 30, "none"),
    ],
)
def test_real_loose_ovfs(tmp_path: Path, ovf: str, capacity: int, manifest: str) -> None:
    dst = tmp_path / "out.qcow2"
    s = summary_of(imgpipe("convert", str(REAL / ovf), str(dst), "--json"))
    assert s["manifest"].startswith(manifest)
    assert s["outputs"][0]["virtual_size"] == capacity
    qemu_check(dst)
    disk = REAL / ovf.rsplit("/", 1)[0] / s["outputs"][0]["member"]
    qemu_compare(disk, dst)


def _retype(archive: bytes, member_index: int, typeflag: bytes) -> bytes:
    """Change one ustar header's type flag and fix its checksum (for types tarfile will not write)."""
    data = bytearray(archive)
    off = 0
    for _ in range(member_index):
        size = int(data[off + 124 : off + 136].split(b"\0")[0] or b"0", 8)
        off += 512 + -(-size // 512) * 512
    data[off + 156 : off + 157] = typeflag
    data[off + 148 : off + 156] = b" " * 8
    data[off + 148 : off + 156] = f"{sum(data[off : off + 512]):06o}\0 ".encode()
    return bytes(data)


@pytest.fixture(scope="module")
def hostile(made: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    one = made["one.ova"].read_bytes()
    v1 = (made["d1"].parent / "v1.vmdk").read_bytes()
    ovf = _ovf([("vmdisk1", "file1", "one-disk1.vmdk", D1_SIZE, VMDK_STREAM)])
    cases: dict[str, bytes] = {}
    bad_sum = bytearray(one)
    bad_sum[0] ^= 0x20  # the first name changes case: the stored checksum no longer adds up
    cases["bad-checksum"] = bytes(bad_sum)
    cases["truncated"] = one[: len(one) - len(v1) // 2]
    sparse = _tar(d / "s.tar", [("one.ovf", ovf), ("one-disk1.vmdk", v1)]).read_bytes()
    cases["gnu-sparse"] = _retype(sparse, 1, b"S")
    inner = _tar(d / "inner.tar", [("disk.img", bytes(4096))]).read_bytes()
    cases["nested-tar"] = _tar(d / "n.tar", [("inner.img", inner)]).read_bytes()
    cases["two-descriptors"] = _tar(d / "t.tar", [("a.ovf", ovf), ("b.ovf", ovf)]).read_bytes()
    cases["huge-descriptor"] = _tar(d / "h.tar", [("a.ovf", ovf + b" " * (5 * MiB))]).read_bytes()
    cases["descriptor-too-late"] = _tar(
        d / "l.tar", [("big.img", made["d1"].read_bytes()), ("one.ovf", ovf), ("one-disk1.vmdk", v1)]
    ).read_bytes()
    wrong_cap = _ovf([("vmdisk1", "file1", "one-disk1.vmdk", D2_SIZE, VMDK_STREAM)])
    cases["capacity-lies"] = _tar(d / "c.tar", [("one.ovf", wrong_cap), ("one-disk1.vmdk", v1)]).read_bytes()
    cases["disk-missing"] = _tar(d / "m.tar", [("one.ovf", ovf)]).read_bytes()
    cases["absolute-name"] = _tar(d / "a.tar", [("/etc/disk.img", bytes(4096))]).read_bytes()
    link = _tar(d / "k.tar", [("one.ovf", ovf), ("one-disk1.vmdk", b"")]).read_bytes()
    cases["link-as-disk"] = _retype(link, 1, b"2")
    cases["long-name"] = _tar(
        d / "ln.tar", [("x" * 5000 + ".img", bytes(4096))], tarfile.PAX_FORMAT
    ).read_bytes()
    sparse_dir = d / "sparse"
    sparse_dir.mkdir()
    with (sparse_dir / "disk.raw").open("wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"data" * 1024)
    subprocess.run(
        ["tar", "-C", str(sparse_dir), "-S", "--format=posix", "-cf", str(d / "sp.tar"), "disk.raw"],
        check=True,
    )
    cases["pax-sparse"] = (d / "sp.tar").read_bytes()
    # An xz stream whose index claims far more blocks than it holds (it must not be buffered).
    xz = bytearray(
        subprocess.run(
            ["xz", "-T2", "--block-size=64KiB", "-c"], input=bytes(200_000), capture_output=True, check=True
        ).stdout
    )
    cases["xz-index-lies"] = bytes(xz[:12]) + b"\x00" + b"\xff" * 8 + b"\x7f" + bytes(1 << 20)
    out = {}
    for name, data in cases.items():
        (d / f"{name}.ova").write_bytes(data)
        out[name] = d / f"{name}.ova"
    return out


HOSTILE = {
    "bad-checksum": "checksum",
    "truncated": "short",
    "gnu-sparse": "GNU sparse",
    "nested-tar": "tar archive inside a package",
    "two-descriptors": "second OVF descriptor",
    "huge-descriptor": "MiB allowed",
    "descriptor-too-late": "must start with its descriptor",
    "capacity-lies": "holds",
    "disk-missing": "does not hold",
    "absolute-name": "/etc/disk.img",
    "link-as-disk": "link",
    "long-name": "more than 4096",
    "pax-sparse": "sparse file",
    "xz-index-lies": "index does not list",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_packages_are_refused(tmp_path: Path, hostile: dict[str, Path], name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    p = imgpipe("convert", str(hostile[name]), f"{out}/")
    assert p.returncode == 3, p.stderr.decode()[-800:]
    line = error_line(p)
    assert HOSTILE[name] in line
    assert line.startswith("imgpipe: error: ")
    assert list(out.iterdir()) == []
    assert leftovers(out) == []


def test_info_describes_packages(tmp_path: Path, made: dict[str, Any], http: RangeHTTPServer) -> None:
    shutil.copy(made["two.ova"], tmp_path / "www" / "two.ova")
    p = imgpipe("info", http.url("/two.ova"), "--json")
    assert p.returncode == 0, p.stderr.decode()[-800:]
    d = json.loads(p.stdout)
    pkg = d["package"]
    assert (d["verdict"], pkg["package"], pkg["manifest"]) == ("accepted", "ova", "verified (3 files)")
    assert [(m["member"], m["kind"], m["format"], m["virtual_size"]) for m in pkg["members"]] == [
        ("two-disk1.vmdk", "disk", "vmdk", D1_SIZE),
        ("two-disk2.qcow2", "disk", "qcow2", D2_SIZE),
    ]
    assert pkg["ovf"]["name"] == "testvm"
    p = imgpipe("info", str(made["uec.tar.gz"]), "--json")
    d = json.loads(p.stdout)
    assert d["wrappers"] == ["gzip"]
    assert [m["kind"] for m in d["package"]["members"]] == ["disk", "kernel", "ramdisk"]
    assert d["package"]["skipped_members"] == ["README.files"]
    p = imgpipe("info", str(made["lying.ova"]))
    assert p.returncode == 3
    assert "manifest" in error_line(p)
    assert "verdict: refused" in p.stdout.decode()
    p = imgpipe("info", str(made["loose"] / "vm.ovf"), "--json")
    d = json.loads(p.stdout)
    assert [disk["href"] for disk in d["package"]["ovf"]["disks"]] == ["vm-disk1.vmdk"]
    assert d["source_bytes_fetched"] < 64 * 1024  # the descriptor only, not the disk beside it


def test_uec_kernel_and_ramdisk_are_named_from_dst(tmp_path: Path, made: dict[str, Any]) -> None:
    dst = tmp_path / "precise.qcow2"
    s = summary_of(imgpipe("convert", str(made["uec.tar.gz"]), str(dst), "--json"))
    assert [(Path(o["destination"]).name, o["kind"]) for o in s["outputs"]] == [
        ("precise.qcow2", "disk"),
        ("precise.aki", "kernel"),
        ("precise.ari", "ramdisk"),
    ]
    qemu_compare(made["d1"], dst)
    assert (tmp_path / "precise.aki").read_bytes() == made["kernel_bytes"]
    assert (tmp_path / "precise.ari").read_bytes() == made["ramdisk_bytes"]


def test_disk_ids_and_member_names_stay_inside_dst(tmp_path: Path, made: dict[str, Any]) -> None:
    """An OVF disk id is not a path: "../../x" names a file inside DST's folder. Two members that would
    go to one name stop the package (exit 2) before anything is written."""
    v1 = (made["d1"].parent / "v1.vmdk").read_bytes()
    ovf = _ovf([("../../escaped", "file1", "one-disk1.vmdk", D1_SIZE, VMDK_STREAM)])
    ova = _tar(tmp_path / "trav.ova", [("one.ovf", ovf), ("one-disk1.vmdk", v1)])
    out = tmp_path / "a" / "b"
    out.mkdir(parents=True)
    s = summary_of(imgpipe("convert", str(ova), f"{out}/", "--json"))
    [o] = s["outputs"]
    assert Path(o["destination"]).parent == out
    assert sorted(p.name for p in out.iterdir()) == ["_.._.._escaped.qcow2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "trav.ova"]
    dup = _tar(tmp_path / "dup.tar", [("a/disk.img", bytes(8192)), ("b/disk.img", bytes(8192))])
    p = imgpipe("convert", str(dup), f"{out}/")
    assert p.returncode == 2
    assert "{index}" in error_line(p)
    assert sorted(p.name for p in out.iterdir()) == ["_.._.._escaped.qcow2"]


def test_info_on_a_broken_compressed_package_fails_instead_of_waiting(
    tmp_path: Path, made: dict[str, Any]
) -> None:
    data = made["uec.tar.gz"].read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    p = imgpipe("info", str(cut), timeout=60)
    assert p.returncode == 3
    assert "truncated" in error_line(p)
