"""qcow2 images, read-only.  Knows nothing of FUSE."""

from sparsefs.layered import MapEntry
from sparsefs.qcow2.image import (
    OpenOptions,
    Qcow2Image,
    open_image,
    open_source,
)

__all__ = ["MapEntry", "OpenOptions", "Qcow2Image", "open_image", "open_source"]
