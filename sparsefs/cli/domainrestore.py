"""``sparsefs restore DEST_DIR --domain NAME [--at RUN] TARGET_DIR [--define [NEW_NAME]]``.

Every disk of the domain's run (``--at``: a run id, a unique prefix, or
``latest``) is restored, verified, to a new file in TARGET_DIR:
``NAME-TARGET.qcow2`` for a qcow2 disk (no backing file), ``NAME-TARGET.raw``
for a raw one (sparse); NAME is NEW_NAME when given.  With ``--define`` the
domain is defined again from the XML stored with that run, its disks on
the restored files; with NEW_NAME under that name, without the old UUID and
MAC addresses (libvirt makes new ones), so it can live beside the original.
"""

from __future__ import annotations

import argparse
import os

from sparsefs.cli.common import EXIT_OK
from sparsefs.domain import domxml
from sparsefs.domain.record import DomainRuns
from sparsefs.errors import SparsefsError
from sparsefs.points.restore import restore
from sparsefs.points.set import BackupSet
from sparsefs.progress import human_bytes, human_duration


def cmd_restore_domain(args: argparse.Namespace) -> int:
    """Restore every disk of a domain's run; with ``--define``, define it on them."""
    target_dir = args.name
    if target_dir is None or args.target is not None:
        raise SparsefsError("restore --domain takes DEST_DIR and TARGET_DIR")
    if not os.path.isdir(target_dir):
        raise SparsefsError(f"{target_dir}: target directory does not exist")
    new_name = args.define or None
    base = new_name or args.domain
    runs = DomainRuns.load(args.dest, args.domain)
    run = runs.resolve(args.at)
    paths: dict[str, tuple[str, str]] = {}
    with BackupSet.open(args.dest, reading=True) as bset:
        for target, entry in sorted(run.disks.items()):
            point = next((p for p in bset.points(entry.disk) if p.id == entry.point), None)
            if point is None:
                raise SparsefsError(
                    f"{bset.path('SPARSEFS-SET.json')}: disk {entry.disk} has no point "
                    f"{entry.point} (run {run.id} of domain {args.domain}): was it pruned?"
                )
            path = os.path.abspath(os.path.join(target_dir, f"{base}-{target}.{entry.format}"))
            result = restore(bset, entry.disk, point, path, overwrite=args.overwrite)
            paths[target] = (path, entry.format)
            if not args.quiet:
                print(
                    f"{path}: disk {target} of {args.domain} at {run.id} restored "
                    f"({result.kind}), {human_bytes(result.data_bytes)} of "
                    f"{human_bytes(point.size)} written and verified in "
                    f"{human_duration(result.seconds)}  {point.digest}"
                )
    if args.define is None:
        return EXIT_OK
    try:
        with open(runs.path(run.xml), encoding="utf-8") as f:
            xml = f.read()
    except OSError as exc:
        raise SparsefsError(f"{runs.path(run.xml)}: cannot read the stored XML: {exc}") from None
    from sparsefs.domain.virt import Connection

    name = new_name or domxml.domain_name(xml)
    with Connection(args.connect) as conn:
        conn.define(domxml.redefine(xml, paths, new_name), name)
    if not args.quiet:
        print(f"domain {name}: defined on the restored disks in {target_dir}")
    return EXIT_OK


def add_arguments(r: argparse.ArgumentParser) -> None:
    """The ``--domain``, ``--define`` and ``--connect`` options of ``restore``."""
    r.add_argument(
        "--domain",
        metavar="NAME",
        help="restore every disk of a run of libvirt domain NAME into TARGET_DIR, the word "
        "after NAME; --at names the run by its id",
    )
    r.add_argument(
        "--define",
        nargs="?",
        const="",
        metavar="NEW_NAME",
        help="with --domain: define the domain again from the XML stored with the run, on the "
        "restored disks; with NEW_NAME, as a new domain (new name, new UUID, new MACs)",
    )
    r.add_argument(
        "--connect", metavar="URI", help="with --define: the libvirt URI (default: libvirt's)"
    )
