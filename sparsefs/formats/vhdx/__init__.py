"""VHDX images (Hyper-V), read-only: dynamic, fixed and differencing.  Knows nothing of FUSE."""

from sparsefs.formats.vhdx.chain import open_image
from sparsefs.formats.vhdx.image import VhdxLayer

__all__ = ["VhdxLayer", "open_image"]
