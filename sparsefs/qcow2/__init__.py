"""qcow2 images, read-only.  Knows nothing of FUSE."""

from sparsefs.qcow2.image import (
    MapEntry,
    OpenOptions,
    Qcow2Image,
    open_image,
    open_source,
)

__all__ = ["MapEntry", "OpenOptions", "Qcow2Image", "open_image", "open_source"]
