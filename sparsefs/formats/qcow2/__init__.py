"""qcow2 images: the reader (with persistent bitmaps) and the writer of points; no FUSE.

This module is the package's public face: code outside :mod:`sparsefs.formats`
uses only the names below; the struct layouts, the cluster map and the open
file with its tables are the package's own.
"""

from sparsefs.formats.qcow2.bitmaps import BitmapError, dirty_ranges, find_bitmap, list_bitmaps
from sparsefs.formats.qcow2.image import Qcow2Image, backing_name, open_image
from sparsefs.formats.qcow2.info import describe_qcow2
from sparsefs.formats.qcow2.writer import Compression, ImageWriteError, Qcow2Writer, WriterStats

__all__ = [
    "BitmapError",
    "Compression",
    "ImageWriteError",
    "Qcow2Image",
    "Qcow2Writer",
    "WriterStats",
    "backing_name",
    "describe_qcow2",
    "dirty_ranges",
    "find_bitmap",
    "list_bitmaps",
    "open_image",
]
