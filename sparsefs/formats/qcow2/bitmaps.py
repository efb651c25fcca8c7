"""Persistent dirty bitmaps of a qcow2 image: the directory, the tables, the dirty ranges.

qemu stores a dirty bitmap per name in the image (spec, "Bitmaps extension"
and "Bitmaps"): a directory of entries, each pointing to a one-level bitmap
table whose entries point to clusters of bitmap data.  Bit ``n`` of the data
(bit ``n % 8`` of byte ``n // 8``, least significant first) says whether
guest bytes ``[n * granularity, (n + 1) * granularity)`` were written while
the bitmap was enabled.

The directory is read and validated on first use (like qemu's
``bitmap_list_load``), not when the image opens: a broken directory stops
only the commands that need bitmaps.  A bitmap's table and data are
validated when its dirty ranges are asked for (qemu's ``load_bitmap``).
Nothing here writes the image.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from sparsefs.errors import ImageFormatError, SparsefsError, UnsupportedFeatureError
from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.image import Qcow2File, Qcow2Image

_NONZERO = re.compile(rb"[^\x00]+")


class BitmapError(SparsefsError):
    """A named bitmap cannot be used: missing, in use, or not fitting the image."""


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One persistent bitmap as the directory describes it.

    Attributes:
        name: the bitmap's name.
        granularity_bits: log2 of the guest bytes one bit stands for.
        flags: the directory entry's flags (``L.BME_FLAG_*``).
        table_offset: host offset of the bitmap table.
        table_size: number of 8-byte entries in the bitmap table.
        extra_data_size: bytes of extra data in the entry (none are defined).
    """

    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int
    extra_data_size: int

    @property
    def granularity(self) -> int:
        """Guest bytes per bit."""
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        """True when a QEMU process holds the bitmap (or died holding it): not trustworthy."""
        return bool(self.flags & L.BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        """True when the bitmap is enabled: every write to the image is recorded."""
        return bool(self.flags & L.BME_FLAG_AUTO)

    @property
    def flag_names(self) -> list[str]:
        """The flags as ``qemu-img info`` names them ("in-use", "auto")."""
        names = []
        if self.in_use:
            names.append("in-use")
        if self.auto:
            names.append("auto")
        return names


def list_bitmaps(image: Qcow2Image) -> list[Bitmap]:
    """The persistent bitmaps of ``image``'s file, in directory order.

    An image whose bitmaps autoclear bit is clear (a program without bitmap
    support wrote it, or a v2 image) has no consistent bitmaps: qemu ignores
    the extension then, and so does this function.

    Raises:
        ImageFormatError: the extension or the directory breaks the spec.
        UnsupportedFeatureError: a bitmap qemu itself could not use
            (granularity, sizes past qemu's limits, an unknown type).
    """
    return _read_directory(image.qfile)


def find_bitmap(image: Qcow2Image, name: str) -> Bitmap:
    """The bitmap called ``name``.

    Raises:
        BitmapError: there is none.
    """
    bitmaps = list_bitmaps(image)
    for bitmap in bitmaps:
        if bitmap.name == name:
            return bitmap
    have = ", ".join(repr(b.name) for b in bitmaps) or "none"
    raise BitmapError(f"{image.path}: no bitmap named {name!r} (bitmaps: {have})")


def _read_directory(qfile: Qcow2File) -> list[Bitmap]:
    exts = [e for e in qfile.extensions if e.ext_type == L.EXT_BITMAPS]
    if not exts:
        return []
    path = qfile.path

    def err(problem: str) -> ImageFormatError:
        return ImageFormatError(f"{path}: {problem}")

    if len(exts) > 1:
        raise err("more than one bitmaps extension")
    if qfile.header.version < 3 or not qfile.header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        return []  # qemu: "all bitmaps are now considered inconsistent"
    try:
        ext = L.BitmapsExtension.from_bytes(exts[0].data)
    except ValueError as exc:
        raise err(str(exc)) from None
    cs = qfile.cluster_size
    if ext.reserved:
        raise err("bitmaps extension: reserved field is not zero")
    if ext.nb_bitmaps == 0:
        raise err("bitmaps extension: nb_bitmaps is 0")
    if ext.nb_bitmaps > L.MAX_BITMAPS:
        raise UnsupportedFeatureError(
            f"{path}: {ext.nb_bitmaps} bitmaps (qemu supports at most {L.MAX_BITMAPS})"
        )
    dir_offset, dir_size = ext.bitmap_directory_offset, ext.bitmap_directory_size
    if dir_offset == 0 or dir_offset % cs:
        raise err(f"bitmap directory offset {dir_offset} is not cluster aligned")
    if dir_size == 0:
        raise err("bitmap directory size is 0")
    if dir_size > L.MAX_BITMAP_DIRECTORY_SIZE:
        raise err(f"bitmap directory too large ({dir_size} bytes)")
    if dir_offset + dir_size > qfile.file.file_size:
        raise err(f"bitmap directory at {dir_offset:#x} runs past the end of the file")
    buf = _pread_exact(qfile, dir_offset, dir_size, "bitmap directory")
    bitmaps: list[Bitmap] = []
    names: set[str] = set()
    pos = 0
    while pos < dir_size:
        if len(bitmaps) >= ext.nb_bitmaps:
            raise err(
                f"bitmap directory holds more than the {ext.nb_bitmaps} bitmaps "
                "the extension declares"
            )
        try:
            entry = L.parse_bitmap_dir_entry(buf, pos)
        except ValueError as exc:
            raise err(str(exc)) from None
        bitmaps.append(_check_entry(qfile, entry, pos, names))
        pos += entry.entry_size
    if len(bitmaps) != ext.nb_bitmaps:
        raise err(
            f"bitmap directory holds {len(bitmaps)} bitmaps, the extension declares "
            f"{ext.nb_bitmaps}"
        )
    return bitmaps


def _check_entry(qfile: Qcow2File, entry: L.BitmapDirEntry, pos: int, names: set[str]) -> Bitmap:
    """Validate one directory entry (qemu's check_dir_entry, plus the spec's musts)."""
    path = qfile.path
    cs = qfile.cluster_size
    try:
        name = entry.name.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageFormatError(
            f"{path}: bitmap at directory byte {pos} has a name that is not valid UTF-8"
        ) from None
    what = f"bitmap {name!r}"
    problem = None
    if not entry.name:
        problem = "has an empty name"
    elif len(entry.name) > L.MAX_BITMAP_NAME_SIZE:
        problem = f"has a name of {len(entry.name)} bytes (at most {L.MAX_BITMAP_NAME_SIZE})"
    elif name in names:
        problem = "appears twice in the bitmap directory"
    elif entry.padding.strip(b"\0"):
        problem = "has non-zero padding in the bitmap directory"
    elif entry.flags & L.BME_RESERVED_FLAGS:
        problem = f"has reserved flags set ({entry.flags:#x})"
    elif entry.bitmap_table_size == 0:
        problem = "has an empty bitmap table"
    elif entry.bitmap_table_offset == 0 or entry.bitmap_table_offset % cs:
        problem = f"bitmap table offset {entry.bitmap_table_offset} is not cluster aligned"
    elif entry.bitmap_table_offset + 8 * entry.bitmap_table_size > qfile.file.file_size:
        problem = "bitmap table runs past the end of the file"
    if problem is not None:
        raise ImageFormatError(f"{path}: {what} {problem}")
    unsupported = None
    if entry.type != L.BITMAP_TYPE_DIRTY_TRACKING:
        unsupported = f"has type {entry.type} (only 1, dirty tracking, is defined)"
    elif not L.MIN_GRANULARITY_BITS <= entry.granularity_bits <= L.MAX_GRANULARITY_BITS:
        unsupported = (
            f"has granularity 2^{entry.granularity_bits} (qemu supports 2^"
            f"{L.MIN_GRANULARITY_BITS} to 2^{L.MAX_GRANULARITY_BITS})"
        )
    elif entry.bitmap_table_size > L.MAX_BITMAP_TABLE_SIZE:
        unsupported = f"has a bitmap table of {entry.bitmap_table_size} entries"
    elif entry.bitmap_table_size * cs > L.MAX_BITMAP_PHYS_SIZE:
        unsupported = f"has {entry.bitmap_table_size * cs} bytes of bitmap data"
    if unsupported is not None:
        raise UnsupportedFeatureError(f"{path}: {what} {unsupported}")
    names.add(name)
    return Bitmap(
        name,
        entry.granularity_bits,
        entry.flags,
        entry.bitmap_table_offset,
        entry.bitmap_table_size,
        len(entry.extra_data),
    )


def expected_table_size(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Bitmap table entries a bitmap of this granularity needs for a virtual ``size``."""
    nb_bits = (size + (1 << granularity_bits) - 1) >> granularity_bits
    nb_bytes = (nb_bits + 63) // 64 * 8  # qemu serializes whole 64-bit words
    return (nb_bytes + cluster_size - 1) // cluster_size


def check_usable(image: Qcow2Image, bitmap: Bitmap) -> None:
    """Refuse a bitmap whose contents cannot be trusted or do not fit the image.

    Raises:
        BitmapError: in use, unknown extra data, or a table that does not fit
            the image's virtual size at the bitmap's granularity.
    """
    what = f"{image.path}: bitmap {bitmap.name!r}"
    if bitmap.in_use:
        raise BitmapError(
            f"{what} is in use (a running QEMU holds it, or one died holding it): "
            "its contents cannot be trusted"
        )
    if bitmap.extra_data_size and not bitmap.flags & L.BME_FLAG_EXTRA_DATA_COMPATIBLE:
        raise BitmapError(f"{what} has extra data sparsefs does not know; it must not be used")
    needed = expected_table_size(image.size, bitmap.granularity_bits, image.qfile.cluster_size)
    if bitmap.table_size != needed:
        raise BitmapError(
            f"{what} does not fit the image: its table has {bitmap.table_size} entries, a "
            f"virtual size of {image.size} bytes at granularity {bitmap.granularity} needs "
            f"{needed}"
        )


def read_table(image: Qcow2Image, bitmap: Bitmap) -> list[int]:
    """The validated bitmap table of ``bitmap`` (qemu's bitmap_table_load).

    Raises:
        ImageFormatError: an entry has reserved bits set, a misaligned
            offset, or points past the end of the file.
    """
    qfile = image.qfile
    cs = qfile.cluster_size
    buf = _pread_exact(qfile, bitmap.table_offset, 8 * bitmap.table_size, "bitmap table")
    table = list(struct.unpack(f">{bitmap.table_size}Q", buf))
    for index, entry in enumerate(table):
        offset = entry & L.BME_TABLE_ENTRY_OFFSET_MASK
        problem = None
        if entry & L.BME_TABLE_ENTRY_RESERVED_MASK:
            problem = "has reserved bits set"
        elif offset and entry & L.BME_TABLE_ENTRY_FLAG_ALL_ONES:
            problem = "has both an offset and the all-ones bit"
        elif offset % cs:
            problem = f"offset {offset:#x} is not cluster aligned"
        elif offset and offset < cs:
            problem = f"offset {offset:#x} overlaps the header"
        elif offset and offset + cs > qfile.file.file_size:
            problem = f"offset {offset:#x} is past the end of the file"
        if problem is not None:
            raise ImageFormatError(
                f"{image.path}: bitmap {bitmap.name!r} table entry {index} {problem}"
            )
    return table


def dirty_ranges(image: Qcow2Image, bitmap: Bitmap) -> Iterator[tuple[int, int]]:
    """The guest ranges ``bitmap`` marks dirty, as ``(guest_offset, length)`` in bytes.

    Ranges are in order, maximal (adjacent dirty bits are merged) and
    clipped to the image's virtual size; each starts on a multiple of the
    granularity.  Clean ranges are not yielded.

    Raises:
        BitmapError: see :func:`check_usable`.
        ImageFormatError: see :func:`read_table`; a data cluster cannot be read.
    """
    check_usable(image, bitmap)
    table = read_table(image, bitmap)
    qfile = image.qfile
    cs = qfile.cluster_size
    gbits = bitmap.granularity_bits
    size = image.size
    bits_per_cluster = cs * 8
    run_start = run_end = -1  # in bits
    for index, entry in enumerate(table):
        first_bit = index * bits_per_cluster
        offset = entry & L.BME_TABLE_ENTRY_OFFSET_MASK
        runs: Iterator[tuple[int, int]]
        if offset == 0:
            if not entry & L.BME_TABLE_ENTRY_FLAG_ALL_ONES:
                continue
            runs = iter(((first_bit, first_bit + bits_per_cluster),))
        else:
            data = _pread_exact(qfile, offset, cs, f"bitmap {bitmap.name!r} data")
            runs = _bit_runs(data, first_bit)
        for start, end in runs:
            if start == run_end:
                run_end = end
                continue
            if run_end > run_start >= 0:
                yield from _clip(run_start << gbits, run_end << gbits, size)
            run_start, run_end = start, end
    if run_end > run_start >= 0:
        yield from _clip(run_start << gbits, run_end << gbits, size)


def _clip(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    end = min(end, size)
    if end > start:
        yield start, end - start


def _bit_runs(data: bytes, first_bit: int) -> Iterator[tuple[int, int]]:
    """Runs of set bits in ``data`` (little-endian bit order) as [start, end) bit numbers."""
    for match in _NONZERO.finditer(data):
        lo, hi = match.span()
        word = int.from_bytes(data[lo:hi], "little")
        bit = first_bit + lo * 8
        while word:
            zeros = (word & -word).bit_length() - 1
            word >>= zeros
            ones = (~word & (word + 1)).bit_length() - 1
            yield bit + zeros, bit + zeros + ones
            word >>= ones
            bit += zeros + ones


def _pread_exact(qfile: Qcow2File, host_offset: int, length: int, what: str) -> bytes:
    try:
        buf = os.pread(qfile.file.fd, length, host_offset)
    except OSError as exc:
        raise ImageFormatError(
            f"{qfile.path}: read of the {what} at {host_offset:#x} failed: {exc.strerror}"
        ) from exc
    if len(buf) != length:
        raise ImageFormatError(
            f"{qfile.path}: {what} at {host_offset:#x} is past the end of the file"
        )
    return buf
