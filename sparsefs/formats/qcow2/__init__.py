"""qcow2 images: the reader (with persistent bitmaps) and the writer of points; no FUSE.

This module is the package's public face: code outside :mod:`sparsefs.formats`
uses only the names below; the struct layouts, the cluster map and the open
file with its tables are the package's own.  Each name is imported from its
module on first use (PEP 562), so that a command pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsefs.formats.qcow2.bitmaps import BitmapError as BitmapError
    from sparsefs.formats.qcow2.bitmaps import dirty_ranges as dirty_ranges
    from sparsefs.formats.qcow2.bitmaps import find_bitmap as find_bitmap
    from sparsefs.formats.qcow2.bitmaps import list_bitmaps as list_bitmaps
    from sparsefs.formats.qcow2.image import Qcow2Image as Qcow2Image
    from sparsefs.formats.qcow2.image import backing_name as backing_name
    from sparsefs.formats.qcow2.image import open_image as open_image
    from sparsefs.formats.qcow2.info import describe_qcow2 as describe_qcow2
    from sparsefs.formats.qcow2.writer import Compression as Compression
    from sparsefs.formats.qcow2.writer import ImageWriteError as ImageWriteError
    from sparsefs.formats.qcow2.writer import Qcow2Writer as Qcow2Writer
    from sparsefs.formats.qcow2.writer import WriterStats as WriterStats

# public name -> the module of this package that defines it
_WHERE = {
    "BitmapError": "bitmaps",
    "dirty_ranges": "bitmaps",
    "find_bitmap": "bitmaps",
    "list_bitmaps": "bitmaps",
    "Qcow2Image": "image",
    "backing_name": "image",
    "open_image": "image",
    "describe_qcow2": "info",
    "Compression": "writer",
    "ImageWriteError": "writer",
    "Qcow2Writer": "writer",
    "WriterStats": "writer",
}

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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
