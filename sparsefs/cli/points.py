"""``sparsefs list`` and ``sparsefs restore``: the points of a backup set, and getting one back.

``list DEST_DIR [--json]`` prints every disk and its points, oldest first,
each checked (metadata only: file present, size and backing chain as the
manifest says); damaged points, and every point that depends on one, are
marked.  Exit status 1 when any point is damaged, so a monitoring job can
alert; ``sparsefs checksum --check SPARSEFS-SUMS`` in DEST_DIR reads the data.

``restore DEST_DIR NAME [--at POINT] TARGET`` writes a point to a new raw
file, a ``.qcow2`` file, or a block device, and verifies it
(:mod:`sparsefs.points.restore`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparsefs.cli.backup import FdProgress, fd_number
from sparsefs.cli.common import EXIT_FAILURE, EXIT_OK, check_progress_fd
from sparsefs.errors import SparsefsError
from sparsefs.points.check import Status, check_set
from sparsefs.points.restore import restore
from sparsefs.points.set import LATEST, BackupSet, Point
from sparsefs.progress import Progress, human_bytes, human_duration


def point_dict(point: Point, status: Status) -> dict[str, Any]:
    """The JSON form of a point in ``list``."""
    return {
        "id": point.id,
        "time": point.time,
        "kind": point.kind,
        "file": point.file,
        "format": point.format,
        "size": point.size,
        "data_bytes": point.data_bytes,
        "digest": point.digest,
        "backing": point.backing,
        "changes": point.changes,
        "changed_bytes": point.changed_bytes,
        "status": status.status,
        "problem": status.problem,
        "blocks_ok": status.blocks_problem is None,
    }


def cmd_list(args: argparse.Namespace) -> int:
    """List the set's disks and points; see the subcommand help."""
    with BackupSet.open(args.dest) as bset:
        statuses = check_set(bset)
        disks: list[dict[str, Any]] = [
            {
                "name": name,
                "points": [point_dict(p, statuses[(name, p.id)]) for p in bset.disks[name]],
            }
            for name in sorted(bset.disks)
        ]
    damaged = any(p["status"] != "ok" for d in disks for p in d["points"])
    if args.json:
        print(json.dumps({"disks": disks}, indent=2))
        return EXIT_FAILURE if damaged else EXIT_OK
    for disk in disks:
        print(disk["name"])
        for p in disk["points"]:
            mark = "" if p["status"] == "ok" else f"  DAMAGED: {p['problem']}"
            print(
                f"  {p['id']:<20} {p['time']}  {p['kind']:<5} {p['format']:<5} "
                f"{human_bytes(p['data_bytes']):>10}  {p['file']}{mark}"
            )
    for disk in disks:
        for p in disk["points"]:
            if p["status"] != "ok":
                print(f"sparsefs: {disk['name']}@{p['id']}: {p['problem']}", file=sys.stderr)
    return EXIT_FAILURE if damaged else EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a point; see the subcommand help."""
    if args.domain is not None:
        from sparsefs.cli import domainrestore

        return domainrestore.cmd_restore_domain(args)
    if args.define is not None or args.connect is not None:
        raise SparsefsError("--define and --connect need --domain NAME")
    if args.name is None or args.target is None:
        raise SparsefsError("restore needs DEST_DIR NAME TARGET (or DEST_DIR --domain NAME DIR)")
    check_progress_fd(args.progress_fd)
    with BackupSet.open(args.dest, reading=True) as bset:
        point = bset.resolve(args.name, args.at)
        total = 2 * point.data_bytes
        fd_progress = FdProgress(args.progress_fd, total) if args.progress_fd is not None else None
        label = f"{args.name}@{point.id}"
        quiet = args.quiet or args.json
        with Progress(total, label=label, enabled=False if quiet else None) as bar:

            def advance(n: int) -> None:
                bar.advance(n)
                if fd_progress is not None:
                    fd_progress.advance(n)

            result = restore(
                bset, args.name, point, args.target, overwrite=args.overwrite, advance=advance
            )
        if fd_progress is not None:
            fd_progress.finish()
    if args.json:
        doc = {
            "ok": True,
            "disk": args.name,
            "point": point.id,
            "target": result.target,
            "target-kind": result.kind,
            "size": point.size,
            "data-bytes": result.data_bytes,
            "sparsefs1": point.digest,
            "seconds": round(result.seconds, 3),
            "phase-seconds": {k: round(v, 3) for k, v in result.phases.items()},
        }
        print(json.dumps(doc, indent=2))
    elif not args.quiet:
        print(
            f"{args.target}: point {point.id} of {args.name} restored ({result.kind}), "
            f"{human_bytes(result.data_bytes)} of {human_bytes(point.size)} written and "
            f"verified in {human_duration(result.seconds)}  {point.digest}"
        )
    return EXIT_OK


def place_positionals(
    args: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser
) -> None:
    """Give ``restore``'s NAME and TARGET the words argparse left after the options."""
    for word in extra:
        if word.startswith("-") and word != "-":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.name is None:
            args.name = word
        elif args.target is None:
            args.target = word
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``list`` and ``restore``."""
    p = sub.add_parser(
        "list",
        help="list the disks and points of a backup set",
        description="List every disk of the backup set in DEST_DIR and its points, oldest "
        "first, with id, time, kind (full/delta), format, stored bytes and file. Each point "
        "is checked (file present, size and backing chain as the manifest records them); "
        "a damaged point and every point depending on it are marked. Exit status 1 when any "
        "point is damaged. 'cd DEST_DIR && sparsefs checksum --check SPARSEFS-SUMS' reads "
        "and checks the data of every point.",
    )
    p.add_argument("dest", metavar="DEST_DIR", help="the backup set")
    p.add_argument("--json", action="store_true", help="print the disks and points as JSON")
    p.set_defaults(func=cmd_list)
    r = sub.add_parser(
        "restore",
        help="write a point of a disk to a file or a block device, verified",
        description="Write point POINT (default: latest) of disk NAME of the backup set in "
        "DEST_DIR to TARGET: a new sparse raw file, a .qcow2 file (no backing file), or an "
        "existing block device (opened exclusively: refused when mounted or held open; "
        "refused when smaller than the point; ranges without data are zeroed with "
        "BLKZEROOUT, so no old byte stays). An existing file or a device needs --overwrite. "
        "The target is read back after a sync and a page drop and must equal the point's "
        "digest. Damaged points, and points depending on them, are refused.",
    )
    r.add_argument("dest", metavar="DEST_DIR", help="the backup set")
    r.add_argument("name", metavar="NAME", nargs="?", help="the disk (with --domain: TARGET_DIR)")
    r.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="raw file, .qcow2 file, or block device",
    )
    r.add_argument(
        "--at",
        metavar="POINT",
        default=LATEST,
        help="the point: an id, a unique prefix of one, or 'latest' (the default)",
    )
    r.add_argument(
        "--overwrite", action="store_true", help="replace an existing file, or write a device"
    )
    r.add_argument(
        "--progress",
        dest="progress_fd",
        type=fd_number,
        metavar="FD",
        help="write progress as 'N/100' lines to file descriptor FD",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    from sparsefs.cli import domainrestore

    domainrestore.add_arguments(r)
    r.set_defaults(func=cmd_restore)
