"""Domain XML (libvirt's ``formatdomain``): the disks a backup takes, and the XML a restore defines.

Only file-backed disks of device ``disk`` are backed up; CD-ROMs and
floppies, shareable and read-only disks are skipped (each with its reason),
and so are disks that are not plain files (block devices, network disks).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from sparsefs.errors import SparsefsError


class DomainXMLError(SparsefsError):
    """The domain XML lacks what a backup or a restore needs."""


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk>`` of a domain.

    Attributes:
        target: its target device (``vda``).
        path: its source file (the active layer), or None.
        fmt: the driver type (``qcow2``, ``raw``, ...).
        skip: why it is not backed up, or None.
    """

    target: str
    path: str | None
    fmt: str
    skip: str | None = None


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXMLError(f"the domain XML cannot be parsed: {exc}") from None


def domain_name(xml: str) -> str:
    """The ``<name>`` of a domain XML."""
    return _parse(xml).findtext("name") or ""


def disks(xml: str) -> list[DomainDisk]:
    """The domain's disks in XML order, each with its skip reason if it is not backed up."""
    out = []
    for disk in _parse(xml).findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            continue
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        device = disk.get("device", "disk")
        skip = None
        if device != "disk":
            skip = f"a {device}"
        elif disk.find("readonly") is not None:
            skip = "read-only"
        elif disk.find("shareable") is not None:
            skip = "shareable"
        elif disk.get("type", "file") != "file" or not path:
            skip = f"not a file (type {disk.get('type')!r})"
        elif fmt not in ("qcow2", "raw"):
            skip = f"of format {fmt!r} (qcow2 and raw disks are backed up)"
        out.append(DomainDisk(dev, path, fmt, skip))
    return out


def redefine(xml: str, paths: dict[str, tuple[str, str]], new_name: str | None) -> str:
    """The XML to define a restored domain: disks on the restored files.

    Args:
        xml: the stored domain XML.
        paths: target -> (restored file, its format); every backed-up disk.
        new_name: a new name: the UUID and MAC addresses are dropped (libvirt
            makes new ones), so the copy can live beside the original.

    Raises:
        DomainXMLError: a disk of ``paths`` is not in the XML.
    """
    root = _parse(xml)
    seen = set()
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in paths:
            continue
        path, fmt = paths[dev]
        seen.add(dev)
        for child in disk.findall("backingStore"):
            disk.remove(child)
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        for attr in list(source.attrib):
            del source.attrib[attr]
        for child in list(source):
            source.remove(child)
        source.set("file", path)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", fmt)
        disk.set("type", "file")
    missing = sorted(set(paths) - seen)
    if missing:
        raise DomainXMLError(f"the stored domain XML has no disk {missing[0]}")
    if new_name is not None:
        name = root.find("name")
        if name is None:
            name = ET.SubElement(root, "name")
        name.text = new_name
        for uuid in root.findall("uuid"):
            root.remove(uuid)
        for iface in root.findall("./devices/interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
    return ET.tostring(root, encoding="unicode")
