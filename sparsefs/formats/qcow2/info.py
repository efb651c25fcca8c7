"""``sparsefs info`` of a qcow2 image: its header, features, chain, snapshots and bitmaps."""

from __future__ import annotations

from typing import Any

from sparsefs.extents import data_size
from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.bitmaps import list_bitmaps
from sparsefs.formats.qcow2.image import Qcow2Image


def describe_qcow2(image: Qcow2Image) -> dict[str, Any]:
    """What ``sparsefs info`` prints of ``image``, as a JSON-ready dict (qemu-img info's keys)."""
    q = image.qfile
    h = q.header
    features = []
    if h.incompatible_features & L.INCOMPAT_DIRTY:
        features.append("dirty")
    if h.incompatible_features & L.INCOMPAT_CORRUPT:
        features.append("corrupt")
    if q.external_data:
        features.append("external data file" + (" (raw)" if q.data_file_raw else ""))
    if q.extended_l2:
        features.append("extended L2 entries (subclusters)")
    if h.compatible_features & L.COMPAT_LAZY_REFCOUNTS:
        features.append("lazy refcounts")
    if any(e.ext_type == L.EXT_BITMAPS for e in q.extensions):
        features.append("persistent bitmaps")
    return {
        "filename": image.path,
        "format": "qcow2",
        "version": h.version,
        "compat": "0.10" if h.version == 2 else "1.1",
        "virtual-size": image.size,
        "cluster-size": q.cluster_size,
        "data-bytes": data_size(image),
        "compression-type": L.COMPRESSION_NAMES.get(q.compression_type, "?"),
        "refcount-bits": h.refcount_bits,
        "backing-filename": q.backing_name,
        "backing-format": q.backing_format,
        "backing-chain": [{"filename": p, "format": f} for p, f in image.chain()],
        "data-file": q.data_file_name,
        "snapshots": [
            {
                "id": s.id_str,
                "name": s.name,
                "virtual-size": s.disk_size if s.disk_size is not None else h.size,
                "date-sec": s.date_sec,
                "vm-state-size": s.vm_state_size,
                "damaged": image.snapshot_problem(s),
            }
            for s in image.snapshots
        ],
        "snapshot-table-damaged": image.snapshot_table_problem,
        "bitmaps": [
            {"name": b.name, "granularity": b.granularity, "flags": b.flag_names}
            for b in list_bitmaps(image)
        ],
        "features": features,
    }
