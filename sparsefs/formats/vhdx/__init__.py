"""VHDX images (Hyper-V), read-only: dynamic, fixed and differencing.  Knows nothing of FUSE."""

from sparsefs.formats.vhdx.image import VhdxLayer, open_image

__all__ = ["VhdxLayer", "open_image"]
