"""``sparsefs map`` and ``sparsefs info``: what an image holds, without mounting."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparsefs.cli.common import EXIT_OK, add_open_options, open_options
from sparsefs.extents import data_size
from sparsefs.qcow2 import Qcow2Image, open_image
from sparsefs.qcow2 import layout as L
from sparsefs.qcow2.bitmaps import dirty_ranges, find_bitmap, list_bitmaps


def cmd_map(args: argparse.Namespace) -> int:
    """Print the extent map; see the subcommand help."""
    if args.bitmap is not None:
        return _map_bitmap(args)
    with open_image(args.image, open_options(args)) as image:
        source = image
        if args.snapshot is not None:
            source = _find_snapshot(image, args.snapshot)
        entries = [e.as_dict() for e in source.iter_map()]
    if args.output == "json":
        out = sys.stdout
        out.write("[")
        out.write(",\n".join(json.dumps(e) for e in entries))
        out.write("]\n")
    else:
        print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
        for e in entries:
            if e["data"] and "offset" in e:
                print(f"{e['start']:<#20x}{e['length']:<#20x}{e['offset']:<#20x}{args.image}")
    return EXIT_OK


def _map_bitmap(args: argparse.Namespace) -> int:
    """``map --bitmap NAME``: the guest ranges the bitmap marks dirty."""
    from sparsefs.errors import SparsefsError

    if args.snapshot is not None:
        raise SparsefsError(f"{args.image}: --bitmap and --snapshot cannot be combined")
    with open_image(args.image, open_options(args)) as image:
        ranges = list(dirty_ranges(image, find_bitmap(image, args.bitmap)))
    if args.output == "json":
        print("[" + ",\n".join(
            json.dumps({"start": s, "length": n, "dirty": True}) for s, n in ranges
        ) + "]")
    else:
        print(f"{'Offset':<20}{'Length':<20}Dirty in bitmap {args.bitmap}")
        for start, length in ranges:
            print(f"{start:<#20x}{length:#x}")
    return EXIT_OK


def _find_snapshot(image: Qcow2Image, key: str) -> Qcow2Image:
    for snap in image.snapshots:
        if key in (snap.id_str, snap.name):
            return image.open_snapshot(snap)
    from sparsefs.errors import SparsefsError

    raise SparsefsError(f"{image.path}: no snapshot with id or name {key!r}")


def describe(image: Qcow2Image) -> dict[str, Any]:
    """Everything ``sparsefs info`` prints, as a JSON-ready dict."""
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


def cmd_info(args: argparse.Namespace) -> int:
    """Print what the image is; see the subcommand help."""
    with open_image(args.image, open_options(args)) as image:
        info = describe(image)
    if args.output == "json":
        print(json.dumps(info, indent=4))
        return EXIT_OK
    print(f"image: {info['filename']}")
    print(f"file format: qcow2 (version {info['version']}, compat {info['compat']})")
    print(f"virtual size: {_human(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"data: {_human(info['data-bytes'])} ({info['data-bytes']} bytes)")
    print(f"cluster size: {info['cluster-size']}")
    print(f"compression type: {info['compression-type']}")
    print(f"refcount bits: {info['refcount-bits']}")
    if info["backing-filename"]:
        fmt = info["backing-format"] or "probed"
        print(f"backing file: {info['backing-filename']} (format: {fmt})")
    for depth, layer in enumerate(info["backing-chain"], start=1):
        print(f"  chain[{depth}]: {layer['filename']} ({layer['format']})")
    if info["data-file"]:
        print(f"data file: {info['data-file']}")
    if info["snapshots"]:
        print("snapshots:")
        print(f"  {'ID':<6}{'NAME':<24}{'VIRTUAL SIZE':>16}")
        for s in info["snapshots"]:
            state = f"  damaged: {s['damaged']}" if s["damaged"] else ""
            print(f"  {s['id']:<6}{s['name']:<24}{s['virtual-size']:>16}{state}")
    if info["snapshot-table-damaged"]:
        print(f"snapshots: damaged: {info['snapshot-table-damaged']}")
    if info["bitmaps"]:
        print("bitmaps:")
        print(f"  {'NAME':<24}{'GRANULARITY':>12}  FLAGS")
        for b in info["bitmaps"]:
            print(f"  {b['name']:<24}{b['granularity']:>12}  {', '.join(b['flags']) or '-'}")
    print(f"features: {', '.join(info['features']) or 'none'}")
    return EXIT_OK


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``map`` and ``info``."""
    m = sub.add_parser(
        "map",
        help="print the data/hole map of an image",
        description="Print the extent map of a qcow2 image in the shape of "
        "'qemu-img map': start, length, depth, present, zero, data, compressed and, "
        "where data is stored uncompressed, its offset in the file.",
    )
    m.add_argument("image", metavar="IMAGE")
    m.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (default: human)")
    m.add_argument("-l", "--snapshot", metavar="SNAPSHOT",
                   help="map an internal snapshot (id or name) instead of the active image")
    m.add_argument("--bitmap", metavar="BITMAP",
                   help="print the guest ranges the persistent dirty bitmap BITMAP marks "
                   "dirty (what qemu-nbd -B BITMAP exports as qemu:dirty-bitmap:BITMAP)")
    add_open_options(m)
    m.set_defaults(func=cmd_map)

    i = sub.add_parser(
        "info",
        help="describe an image: version, sizes, chain, snapshots, features",
        description="Describe a qcow2 image: format version, virtual size, cluster size, "
        "bytes of stored data, compression type, backing chain, internal snapshots, "
        "persistent bitmaps (name, granularity, flags) and the features in use.",
    )
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (default: human)")
    add_open_options(i)
    i.set_defaults(func=cmd_info)
