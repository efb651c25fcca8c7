"""VMDK: hosted sparse, streamOptimized, flat and zero extents, delta (differencing) disks.

``open_image(path, options, chain)`` is the registry's opener; ``probe`` is
qemu's vmdk_probe; :mod:`.layout` holds the on-disk structures and the
descriptor parser, :mod:`.extents` the run producers, :mod:`.image` the layer.
"""

from __future__ import annotations

import os
from typing import Any

from sparsefs.extents import SparseSource
from sparsefs.formats.vmdk.image import VmdkLayer, check_parent_cid, open_layer
from sparsefs.formats.vmdk.layout import probe


def open_image(path: str | os.PathLike[str], options: Any, chain: tuple[str, ...] = ()) -> Any:
    """Open a VMDK image read-only as a LayeredImage, its parent (delta disks) below it.

    The parent named by ``parentFileNameHint`` is opened through the registry
    as VMDK (as qemu does) and must carry the CID this delta records.

    Raises:
        ImageFormatError: invalid metadata, or a parent CID mismatch.
        UnsupportedFeatureError: a refused feature (names it).
        MissingFileError: the image, an extent file or the parent is missing.
    """
    from sparsefs.formats import open_parent
    from sparsefs.layered import LayeredImage

    layer = open_layer(path, options)
    below: SparseSource | None = None
    try:
        hint = layer.parent_hint
        if hint is not None and getattr(options, "backing", True):
            parent_path, below = open_parent(
                layer.path, layer.fd, hint, "vmdk", options, chain, what="parent file"
            )
            check_parent_cid(layer, parent_path)
    except BaseException:
        if below is not None:
            getattr(below, "close", lambda: None)()
        layer.close()
        raise
    return LayeredImage(layer, below)


__all__ = ["VmdkLayer", "open_image", "open_layer", "probe"]
