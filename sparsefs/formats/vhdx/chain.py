"""Opening a VHDX image and its parent chain: finding, checking and opening the parent.

A differencing disk names its parent in a parent locator ([MS-VHDX] 2.6.2.6):
paths (tried in order) and ``parent_linkage``, the parent's DataWriteGuid
when the child was made.  A candidate whose DataWriteGuid differs is not the
parent (it was changed since, or is another disk), and is refused.  The
parent is opened through the registry (``formats.open_parent``), which owns
name resolution, ``--backing-dir``, loops and the chain length.

Knows nothing of FUSE.
"""

from __future__ import annotations

import os

from sparsefs.errors import ImageFormatError, MissingFileError
from sparsefs.formats import open_parent
from sparsefs.formats.vhdx import layout as L
from sparsefs.formats.vhdx.image import VhdxLayer
from sparsefs.layered import LayeredImage, LayerOptions, check_regular_file, resolve_name
from sparsefs.raw import RawFile


def parent_candidates(entries: dict[str, str]) -> list[str]:
    """Parent file names to try, in [MS-VHDX] 2.6.2.6.1 order, as POSIX paths.

    ``relative_path`` first (``.\\parent.vhdx`` -> ``./parent.vhdx``), then
    ``absolute_win32_path`` when it is a POSIX path; a drive-letter or volume
    path cannot be followed on this host, so only its file name is tried,
    beside the image (the DataWriteGuid check guards that guess).
    """
    out: list[str] = []
    rel = entries.get("relative_path")
    if rel:
        out.append(rel.replace("\\", "/"))
    for key in ("absolute_win32_path", "volume_path"):
        value = entries.get(key)
        if not value:
            continue
        posix = value.replace("\\", "/")
        if posix.startswith("/") and not posix.startswith("//"):
            out.append(posix)
        else:
            out.append(posix.rsplit("/", 1)[-1])
    return [c for c in dict.fromkeys(out) if c]  # first occurrence of each, in order


def read_data_write_guid(path: str) -> bytes | None:
    """The DataWriteGuid of the VHDX file at ``path`` (its active header), or None if not VHDX."""
    raw = RawFile(path)
    try:
        if raw.file_size < L.REGION_TABLE_OFFSET:
            return None
        section = raw.pread(0, L.REGION_TABLE_OFFSET)
    finally:
        raw.close()
    if section[:8] != L.FILE_SIGNATURE:
        return None
    try:
        header = L.active_header(
            section[L.HEADER1_OFFSET : L.HEADER1_OFFSET + L.HEADER_SIZE],
            section[L.HEADER2_OFFSET : L.HEADER2_OFFSET + L.HEADER_SIZE],
        )
    except L.LayoutError:
        return None
    return header.data_write_guid


def _find_parent(layer: VhdxLayer, options: LayerOptions) -> str:
    """The parent's path: the first candidate that exists and whose DataWriteGuid matches.

    Raises:
        ImageFormatError: the locator has no parent_linkage or no path.
        MissingFileError: no candidate exists, or none has the linked DataWriteGuid.
    """
    assert layer.locator is not None
    entries = layer.locator.entries
    linkage = entries.get("parent_linkage")
    if not linkage:
        raise ImageFormatError(f"{layer.path}: parent locator has no parent_linkage")
    wanted = {linkage.strip().upper()}
    if entries.get("parent_linkage2"):
        wanted.add(entries["parent_linkage2"].strip().upper())
    candidates = parent_candidates(entries)
    if not candidates:
        raise ImageFormatError(f"{layer.path}: parent locator names no parent path")
    mismatched: list[str] = []
    tried: list[str] = []
    for name in candidates:
        path = resolve_name(layer.path, name, what="parent", backing_dir=options.backing_dir)
        tried.append(path)
        if not os.path.exists(path):
            continue
        check_regular_file(path, "parent", layer.path)
        guid = read_data_write_guid(path)
        if guid is not None and L.guid_text(guid) in wanted:
            return path
        mismatched.append(path)
    if mismatched:
        raise MissingFileError(
            f"{layer.path}: parent {mismatched[0]} is not the linked parent (its DataWriteGuid "
            f"is not {linkage}; was it modified after the differencing disk was made?)"
        )
    raise MissingFileError(f"{layer.path}: parent is missing (tried {', '.join(tried)})")


def open_image(
    path: str | os.PathLike[str],
    options: LayerOptions,
    chain: tuple[str, ...] = (),
) -> LayeredImage:
    """Open a VHDX image read-only, validate it, and open its parent chain.

    Args:
        path: the image.
        options: open options (``backing`` False presents a differencing disk
            alone: what it does not store reads as zeros).
        chain: real paths and identities of the images above (loop detection).

    Raises:
        ImageFormatError: invalid structures (named).
        UnsupportedFeatureError: refused features (named).
        MissingFileError: the image or its parent is missing.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageFormatError(f"{path}: is a directory, not an image")
    layer = VhdxLayer(path, options)
    below = None
    try:
        if layer.has_parent and options.backing:
            parent = _find_parent(layer, options)
            # [MS-VHDX] 2.6.2.6.1: the parent of a VHDX differencing disk is a VHDX file.
            _, below = open_parent(
                layer.path,
                layer.raw.fd,
                parent,
                "vhdx",
                options,  # type: ignore[arg-type]  # open_parent reads only LayerOptions' fields
                chain,
                what="parent",
            )
    except BaseException:
        layer.close()
        raise
    return LayeredImage(layer, below)
