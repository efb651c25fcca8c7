"""``sparsefs map`` and ``sparsefs info``: what an image holds, without mounting."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparsefs.cli.common import EXIT_OK, add_open_options, open_options
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource, data_size
from sparsefs.formats import FORMAT_NAMES, open_source
from sparsefs.formats.qcow2 import (
    Qcow2Image,
    open_image,
)
from sparsefs.layered import MapEntry, below_map


def cmd_map(args: argparse.Namespace) -> int:
    """Print the extent map; see the subcommand help."""
    if args.bitmap is not None:
        return _map_bitmap(args)
    image = open_source(args.image, args.format, open_options(args))
    try:
        entries = [e.as_dict() for e in _map_of(image, args.snapshot)]
    finally:
        _close(image)
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
    if args.snapshot is not None:
        raise SparsefsError(f"{args.image}: --bitmap and --snapshot cannot be combined")
    if args.format not in (None, "qcow2"):
        raise SparsefsError(f"{args.image}: persistent bitmaps exist only in qcow2 images")
    from sparsefs.formats.qcow2 import dirty_ranges, find_bitmap  # only map --bitmap

    with open_image(args.image, open_options(args)) as image:
        ranges = list(dirty_ranges(image, find_bitmap(image, args.bitmap)))
    if args.output == "json":
        print(
            "["
            + ",\n".join(json.dumps({"start": s, "length": n, "dirty": True}) for s, n in ranges)
            + "]"
        )
    else:
        print(f"{'Offset':<20}{'Length':<20}Dirty in bitmap {args.bitmap}")
        for start, length in ranges:
            print(f"{start:<#20x}{length:#x}")
    return EXIT_OK


def _close(source: SparseSource) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _map_of(image: SparseSource, snapshot: str | None) -> list[MapEntry]:
    """The qemu-img map entries of ``image`` (or of its internal ``snapshot``)."""
    if snapshot is not None:
        if not isinstance(image, Qcow2Image):
            path = getattr(image, "path", "?")
            raise SparsefsError(f"{path}: has no internal snapshots (only qcow2 has them)")
        return list(_find_snapshot(image, snapshot).iter_map())
    iter_map = getattr(image, "iter_map", None)
    if iter_map is not None:
        return list(iter_map())
    # A raw file: its own extents, one layer.
    return list(below_map(image, 0, image.size, -1))


def _find_snapshot(image: Qcow2Image, key: str) -> Qcow2Image:
    for snap in image.snapshots:
        if key in (snap.id_str, snap.name):
            return image.open_snapshot(snap)
    raise SparsefsError(f"{image.path}: no snapshot with id or name {key!r}")


def describe(image: SparseSource) -> dict[str, Any]:
    """Everything ``sparsefs info`` prints, as a JSON-ready dict."""
    if isinstance(image, Qcow2Image):
        from sparsefs.formats.qcow2 import describe_qcow2  # info alone

        return describe_qcow2(image)
    return _describe_other(image)


def _describe_other(image: SparseSource) -> dict[str, Any]:
    """``info`` of a non-qcow2 image: common facts plus what its layer describes."""
    own = getattr(image, "describe", None)
    chain = getattr(image, "chain", None)
    info: dict[str, Any] = {
        "filename": getattr(image, "path", "?"),
        "format": getattr(image, "format_name", "raw"),
        "virtual-size": image.size,
        "data-bytes": data_size(image),
        "backing-chain": [{"filename": p, "format": f} for p, f in chain()] if chain else [],
        "snapshots": [],
        "features": [],
    }
    if own is not None:
        info.update(own())
    return info


def cmd_info(args: argparse.Namespace) -> int:
    """Print what the image is; see the subcommand help."""
    image = open_source(args.image, args.format, open_options(args))
    try:
        info = describe(image)
    finally:
        _close(image)
    if args.output == "json":
        print(json.dumps(info, indent=4))
        return EXIT_OK
    print(f"image: {info['filename']}")
    if info["format"] == "qcow2":
        print(f"file format: qcow2 (version {info['version']}, compat {info['compat']})")
    else:
        print(f"file format: {info['format']}")
    print(f"virtual size: {_human(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"data: {_human(info['data-bytes'])} ({info['data-bytes']} bytes)")
    shown = {
        "filename",
        "format",
        "version",
        "compat",
        "virtual-size",
        "data-bytes",
        "backing-filename",
        "backing-format",
        "backing-chain",
        "data-file",
        "snapshots",
        "snapshot-table-damaged",
        "features",
    }
    for key, value in info.items():
        if key not in shown and not isinstance(value, (dict, list)):
            print(f"{key.replace('-', ' ')}: {value}")
    if info.get("backing-filename"):
        fmt = info.get("backing-format") or "probed"
        print(f"backing file: {info['backing-filename']} (format: {fmt})")
    for depth, layer in enumerate(info["backing-chain"], start=1):
        print(f"  chain[{depth}]: {layer['filename']} ({layer['format']})")
    if info.get("data-file"):
        print(f"data file: {info['data-file']}")
    if info["snapshots"]:
        print("snapshots:")
        print(f"  {'ID':<6}{'NAME':<24}{'VIRTUAL SIZE':>16}")
        for s in info["snapshots"]:
            state = f"  damaged: {s['damaged']}" if s["damaged"] else ""
            print(f"  {s['id']:<6}{s['name']:<24}{s['virtual-size']:>16}{state}")
    if info.get("snapshot-table-damaged"):
        print(f"snapshots: damaged: {info['snapshot-table-damaged']}")
    if info.get("bitmaps"):
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``map`` and ``info``."""
    m = sub.add_parser(
        "map",
        help="print the data/hole map of an image",
        description="Print the extent map of an image (any format) in the shape of "
        "'qemu-img map': start, length, depth, present, zero, data, compressed and, "
        "where data is stored uncompressed, its offset in the file.",
    )
    m.add_argument("image", metavar="IMAGE")
    m.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="output format (default: human)",
    )
    m.add_argument(
        "-f",
        "--format",
        choices=FORMAT_NAMES,
        help="format of IMAGE (default: probed by magic, raw when none matches)",
    )
    m.add_argument(
        "-l",
        "--snapshot",
        metavar="SNAPSHOT",
        help="map an internal snapshot (id or name) instead of the active image",
    )
    m.add_argument(
        "--bitmap",
        metavar="BITMAP",
        help="print the guest ranges the persistent dirty bitmap BITMAP marks "
        "dirty (what qemu-nbd -B BITMAP exports as qemu:dirty-bitmap:BITMAP)",
    )
    add_open_options(m)
    m.set_defaults(func=cmd_map)

    i = sub.add_parser(
        "info",
        help="describe an image: version, sizes, chain, snapshots, features",
        description="Describe an image (any format): format, virtual size, cluster size, "
        "bytes of stored data, compression type, backing chain, internal snapshots, "
        "persistent bitmaps (qcow2: name, granularity, flags) and the features in use.",
    )
    i.add_argument("image", metavar="IMAGE")
    i.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="output format (default: human)",
    )
    i.add_argument(
        "-f",
        "--format",
        choices=FORMAT_NAMES,
        help="format of IMAGE (default: probed by magic, raw when none matches)",
    )
    add_open_options(i)
    i.set_defaults(func=cmd_info)
