"""Domain XML and run records of ``--domain``, without libvirt: which disks, the redefined XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sparsefs.domain import domxml
from sparsefs.domain.record import DiskRun, DomainRuns, Run
from sparsefs.points.set import BackupSet, Point, SetError

XML = """<domain type='kvm'>
  <name>web</name><uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/img/web.qcow2'/><backingStore type='file'><format type='qcow2'/>
      <source file='/img/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/img/data.raw'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc'/><readonly/>
    </disk>
    <disk type='file' device='disk'><driver type='raw'/><source file='/img/ro.raw'/>
      <target dev='vdc'/><readonly/></disk>
    <disk type='file' device='disk'><driver type='raw'/><source file='/img/sh.raw'/>
      <target dev='vdd'/><shareable/></disk>
    <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/sdz'/>
      <target dev='vde'/></disk>
    <disk type='file' device='disk'><driver type='vmdk'/><source file='/img/x.vmdk'/>
      <target dev='vdf'/></disk>
    <interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/>
    </interface>
  </devices>
</domain>"""


def test_disks_and_skip_reasons() -> None:
    got = {d.target: (d.path, d.fmt, d.skip) for d in domxml.disks(XML)}
    assert got["vda"] == ("/img/web.qcow2", "qcow2", None)
    assert got["vdb"] == ("/img/data.raw", "raw", None)
    assert got["hdc"][2] == "a cdrom"
    assert got["vdc"][2] == "read-only"
    assert got["vdd"][2] == "shareable"
    assert "not a file" in str(got["vde"][2])
    assert "vmdk" in str(got["vdf"][2])
    assert domxml.domain_name(XML) == "web"


def test_redefine_new_name_drops_uuid_and_macs_and_moves_disks() -> None:
    paths = {"vda": ("/r/web2-vda.qcow2", "qcow2"), "vdb": ("/r/web2-vdb.raw", "raw")}
    root = ET.fromstring(domxml.redefine(XML, paths, "web2"))
    assert root.findtext("name") == "web2"
    assert root.find("uuid") is None
    assert root.find("./devices/interface/mac") is None
    disks = {d.target: d for d in domxml.disks(ET.tostring(root, encoding="unicode"))}
    assert disks["vda"].path == "/r/web2-vda.qcow2"
    assert disks["vdb"].path == "/r/web2-vdb.raw"
    assert root.find("./devices/disk/backingStore") is None  # the restored file has none
    assert disks["hdc"].path == "/iso/x.iso"  # not backed up: as it was


def test_redefine_same_name_keeps_uuid() -> None:
    root = ET.fromstring(domxml.redefine(XML, {"vda": ("/r/a.qcow2", "qcow2")}, None))
    assert root.findtext("name") == "web"
    assert root.findtext("uuid") == "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def test_redefine_refuses_a_disk_the_xml_lacks() -> None:
    with pytest.raises(domxml.DomainXMLError, match="no disk vdz"):
        domxml.redefine(XML, {"vdz": ("/r/x.raw", "raw")}, None)


def _point(pid: str) -> Point:
    return Point(pid, "", "full", f"web-vda/web-vda@{pid}.raw", "raw", 1, 0, "d", "b")


def test_runs_resolve_and_forget_pruned(tmp_path: Path) -> None:
    runs = DomainRuns(str(tmp_path), "web")
    for rid in ("20261201T000000Z", "20261202T000000Z", "20261203T000000Z"):
        runs.save_xml(rid, XML)
        disk = DiskRun("web-vda", rid, "raw", "/img/data.raw")
        runs.add(Run(rid, "running", "paused", f"web.libvirt/{rid}.xml", None, {"vda": disk}))
    assert DomainRuns.load(str(tmp_path), "web").resolve("20261202").id == "20261202T000000Z"
    with pytest.raises(SetError, match="several"):
        runs.resolve("2026120")
    bset = BackupSet(str(tmp_path), {"web-vda": [_point("20261203T000000Z")]})
    assert runs.forget_pruned(bset) == ["20261201T000000Z", "20261202T000000Z"]
    again = DomainRuns.load(str(tmp_path), "web")
    assert [r.id for r in again.runs] == ["20261203T000000Z"]
    assert sorted(p.name for p in (tmp_path / "web.libvirt").iterdir()) == ["20261203T000000Z.xml"]
