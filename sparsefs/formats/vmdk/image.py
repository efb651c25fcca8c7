"""A VMDK image as one layer of the layered base: its extents, its descriptor, its parent.

Opening follows qemu's vmdk_open: a file starting with ``KDMV`` is one hosted
sparse extent (monolithicSparse, streamOptimized) whose descriptor is embedded
at byte 512; anything else is a text descriptor whose extent lines name
SPARSE, FLAT and ZERO extents (twoGbMaxExtentSparse, monolithicFlat,
twoGbMaxExtentFlat).  A delta disk names its parent with
``parentFileNameHint``; the parent is opened through the registry and its CID
must equal the delta's ``parentCID`` (qemu's vmdk_is_cid_valid).

Where sparsefs differs from qemu 7.2: qemu drops every extent line whose
access is not RW and every ZERO extent (the disk shrinks by their size);
sparsefs follows the VMDK specification: RDONLY extents read normally, ZERO
extents read as zeros, NOACCESS extents are an error (EIO) to read.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from typing import Any

from sparsefs.errors import MissingFileError, SparsefsError
from sparsefs.formats.vmdk import layout as L
from sparsefs.formats.vmdk.extents import (
    ConstExtent,
    FlatExtent,
    Run,
    SparseExtent,
    format_error,
    unsupported,
)
from sparsefs.layered import ERROR, OTHER, ZERO, check_regular_file, resolve_name
from sparsefs.raw import RawFile

EMBEDDED_DESCRIPTOR_OFFSET = 0x200  # qemu reads the embedded descriptor here
EMBEDDED_DESCRIPTOR_BYTES = 20 * L.SECTOR_SIZE  # and this much of it (DESC_SIZE)
MAX_EXTENTS = 4096
GT_CACHE_BYTES = 8 << 20  # decoded grain tables kept, per image (default)
GRAIN_CACHE_BYTES = 4 << 20  # decompressed grains kept, per image (default)
NO_PARENT_CID = 0xFFFF_FFFF

Extent = SparseExtent | FlatExtent | ConstExtent


def read_descriptor(raw: RawFile) -> tuple[bool, L.Descriptor]:
    """(is_sparse, descriptor) of an open VMDK file: embedded at 0x200, or the file's text.

    Raises:
        ImageFormatError: the file is too short, or an extent line is malformed.
        UnsupportedFeatureError: a refused extent type.
    """
    if raw.file_size < 4:
        raise format_error(raw.path, "file too small to be a VMDK image")
    head = raw.pread(0, 4)
    sparse = head in (L.VMDK4_MAGIC, L.VMDK3_MAGIC)
    if sparse:
        n = max(0, min(EMBEDDED_DESCRIPTOR_BYTES, raw.file_size - EMBEDDED_DESCRIPTOR_OFFSET))
        text = L.decode_text(raw.pread(EMBEDDED_DESCRIPTOR_OFFSET, n)) if n else ""
    else:
        text = L.decode_text(raw.pread(0, min(raw.file_size, L.MAX_DESCRIPTOR_BYTES)))
    try:
        # Extent lines of an embedded descriptor are not used (qemu ignores them).
        desc = (
            L.parse_descriptor(text)
            if not sparse
            else L.Descriptor(L.parse_descriptor(_fields_only(text)).fields, ())
        )
    except L.LayoutUnsupported as exc:
        raise unsupported(raw.path, str(exc)) from None
    except L.LayoutError as exc:
        raise format_error(raw.path, str(exc)) from None
    return sparse, desc


def _fields_only(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "=" in line)


def read_cid(path: str) -> int | None:
    """The CID in the descriptor of the VMDK file at ``path`` (None when it has none).

    Raises:
        SparsefsError: the file cannot be opened or its descriptor is invalid.
    """
    with RawFile(path) as raw:
        return read_descriptor(raw)[1].cid


class VmdkLayer:
    """One VMDK image (all its extents) as a layer: runs, compressed reads, description.

    Build with :func:`open_layer`.  Guest offsets are bytes from the start of
    the virtual disk; extents follow each other in descriptor order.
    """

    format_name = "vmdk"

    def __init__(
        self,
        path: str,
        create_type: str,
        desc: L.Descriptor,
        extents: list[Extent],
        files: list[RawFile],
    ) -> None:
        self.path = path
        self.create_type = create_type
        self.descriptor = desc
        self.extents = extents
        self._files = files
        self.starts: list[int] = []
        pos = 0
        for ext in extents:
            self.starts.append(pos)
            pos += ext.size
        self.size = pos

    @property
    def fd(self) -> int:
        """The descriptor (or sparse) file's descriptor, for loop checks."""
        return self._files[0].fd

    @property
    def parent_hint(self) -> str | None:
        """The parent file name of a delta disk, as written in the descriptor."""
        return self.descriptor.parent_hint

    def runs(self, guest_start: int, guest_end: int) -> Iterator[Run]:
        """Runs ``(start, end, kind, host)`` covering ``[guest_start, guest_end)`` in order."""
        guest_end = min(guest_end, self.size)
        i = max(0, bisect.bisect_right(self.starts, guest_start) - 1)
        pos = guest_start
        while pos < guest_end and i < len(self.extents):
            base = self.starts[i]
            ext = self.extents[i]
            stop = min(guest_end, base + ext.size)
            if stop > pos:
                for s, e, kind, host in ext.runs(pos - base, stop - base):
                    if kind == OTHER:
                        host = (host[0], host[1] + base, host[2], base)
                    yield s + base, e + base, kind, host
                pos = stop
            i += 1

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """Bytes ``[start, end)`` of a compressed grain (an OTHER run's ``host``).

        Raises:
            ImageReadError: the grain is corrupt.
        """
        extent, grain_start, host_offset, base = host
        assert isinstance(extent, SparseExtent)
        return extent.read_compressed(grain_start - base, host_offset, start - base, end - base)

    def close(self) -> None:
        """Close every extent file; idempotent."""
        for raw in self._files:
            raw.close()

    def describe(self) -> dict[str, Any]:
        """Format details for ``sparsefs info``."""
        d = self.descriptor
        out: dict[str, Any] = {
            "create-type": self.create_type,
            "cid": f"{d.cid:08x}" if d.cid is not None else None,
            "parent-cid": f"{d.parent_cid:08x}" if d.parent_cid is not None else None,
            "extents": [],
        }
        if d.parent_hint is not None:
            out["parent-filename-hint"] = d.parent_hint
        for base, ext in zip(self.starts, self.extents, strict=True):
            item: dict[str, Any] = {"start": base, "length": ext.size}
            if isinstance(ext, SparseExtent):
                h = ext.header
                item.update(
                    type="SPARSE",
                    filename=ext.path,
                    version=h.version,
                    grain_size=ext.grain_size,
                    compressed=h.compressed,
                    zeroed_grain=h.has_zero_grain,
                )
            elif isinstance(ext, FlatExtent):
                item.update(type="FLAT", filename=ext.path, offset=ext.offset)
            else:
                item.update(type="ZERO" if ext.kind == ZERO else "NOACCESS")
            out["extents"].append(item)
        return out


def _cache_items(options: Any, extent_count: int) -> tuple[int, int]:
    gt_bytes = int(getattr(options, "l2_cache_bytes", GT_CACHE_BYTES) or GT_CACHE_BYTES)
    grain_bytes = int(
        getattr(options, "compressed_cache_bytes", GRAIN_CACHE_BYTES) or GRAIN_CACHE_BYTES
    )
    per = max(1, extent_count)
    return max(2, gt_bytes // (2048 * per)), grain_bytes // per


def open_layer(path: str | os.PathLike[str], options: Any = None) -> VmdkLayer:
    """Open a VMDK image (descriptor or sparse file) and all its extents; validate them.

    Raises:
        ImageFormatError: invalid header, footer, grain directory, descriptor.
        UnsupportedFeatureError: SE sparse, VMFS sparse, encryption, unknown
            flags or types, raw device mappings.
        MissingFileError: the file or an extent file it names is missing.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise format_error(path, "is a directory, not an image")
    top = RawFile(path)
    files = [top]
    try:
        return _open_layer(path, top, files, options)
    except BaseException:
        for raw in files:
            raw.close()
        raise


def _open_layer(path: str, top: RawFile, files: list[RawFile], options: Any) -> VmdkLayer:
    sparse, desc = read_descriptor(top)
    for key in desc.fields:
        if "encrypt" in key.lower():
            raise unsupported(path, f"encrypted VMDK ({key} in the descriptor) is not supported")
    tables, grains = _cache_items(options, max(1, len(desc.extents)))
    if sparse:
        ext = SparseExtent.open(top, tables, grains)
        create_type = (
            "streamOptimized" if ext.header.compressed else (desc.create_type or "monolithicSparse")
        )
        return VmdkLayer(path, create_type, desc, [ext], files)
    create_type = desc.create_type or ""
    if not create_type:
        raise format_error(path, "no createType in the descriptor")
    if create_type in L.REFUSED_TYPES:
        raise unsupported(path, L.REFUSED_TYPES[create_type])
    if create_type not in L.DESCRIPTOR_TYPES:
        raise unsupported(path, f"VMDK createType {create_type!r} is not supported")
    if not desc.extents:
        raise format_error(path, "the descriptor lists no extents")
    if len(desc.extents) > MAX_EXTENTS:
        raise unsupported(
            path, f"{len(desc.extents)} extents (sparsefs reads at most {MAX_EXTENTS})"
        )
    extents: list[Extent] = []
    opened = {os.path.realpath(path): top}
    for n, line in enumerate(desc.extents):
        extents.append(
            _open_extent(
                path, n, line, files, opened, tables, grains, getattr(options, "backing_dir", None)
            )
        )
    layer = VmdkLayer(path, create_type, desc, extents, files)
    if layer.size > L.MAX_DISK_BYTES:
        raise format_error(path, f"the extents add up to {layer.size} bytes, too large a disk")
    return layer


def _open_extent(
    path: str,
    n: int,
    line: L.ExtentLine,
    files: list[RawFile],
    opened: dict[str, RawFile],
    tables: int,
    grains: int,
    backing_dir: str | None,
) -> Extent:
    size = line.sectors * L.SECTOR_SIZE
    if line.access == "NOACCESS":
        return ConstExtent(size, ERROR, f"{path}: extent {n} is NOACCESS")
    if line.kind == "ZERO":
        return ConstExtent(size, ZERO)
    assert line.file_name is not None
    # Extent names resolve like parent names; --backing-dir confines them too, so a
    # descriptor cannot make a mount serve a file from elsewhere on the host.
    ext_path = resolve_name(path, line.file_name, what="extent file", backing_dir=backing_dir)
    if not os.path.lexists(ext_path):
        raise MissingFileError(f"{path}: extent file {ext_path} is missing")
    check_regular_file(ext_path, "extent file", path)
    # One open file per distinct file, however many extent lines name it.
    real = os.path.realpath(ext_path)
    raw = opened.get(real)
    if raw is None:
        raw = opened[real] = RawFile(ext_path)
        files.append(raw)
    if line.kind == "FLAT":
        return FlatExtent(raw, line.offset * L.SECTOR_SIZE, size)
    head = raw.pread(0, 4) if raw.file_size >= 4 else b""
    if head not in (L.VMDK4_MAGIC, L.VMDK3_MAGIC) and raw.pread(0, 8) != L.SESPARSE_MAGIC:
        raise format_error(ext_path, "SPARSE extent is not a VMDK sparse file")
    # qemu sizes a sparse extent by its own header's capacity, not the line's count.
    return SparseExtent.open(raw, tables, grains)


def check_parent_cid(layer: VmdkLayer, parent_path: str) -> None:
    """Refuse a delta whose ``parentCID`` is not its parent's CID (qemu's vmdk_is_cid_valid).

    qemu fails every read that reaches such a parent; sparsefs refuses at open.

    Raises:
        ImageFormatError: the CIDs differ, or the parent has none.
    """
    try:
        parent_cid = read_cid(parent_path)
    except SparsefsError as exc:
        raise format_error(
            layer.path, f"parent {parent_path} is not a readable VMDK ({exc})"
        ) from None
    want = layer.descriptor.parent_cid
    if want is None or parent_cid != want:
        got = "none" if parent_cid is None else f"{parent_cid:08x}"
        exp = "none" if want is None else f"{want:08x}"
        raise format_error(
            layer.path,
            f"parentCID {exp} does not match the CID {got} of "
            f"parent {parent_path} (the parent changed after this delta "
            "was made)",
        )
