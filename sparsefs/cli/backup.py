"""``sparsefs backup``: add a verified point per image to the backup set in DEST_DIR.

No FUSE mount is involved.  DEST_DIR is a backup set
(:mod:`sparsefs.points.set`); each image (and, with ``--snapshots``, each
internal snapshot) is a disk of it, and each run adds one point per disk
(:mod:`sparsefs.cli.setbackup`): a full point when the disk has none (or with
``--full``), a delta point holding the 64 KiB blocks that changed otherwise
(``--since BITMAP``: from a dirty bitmap; else by comparing block digests).

A full raw point is written from the one extent walk of the image: holes stay
holes, and only stored data is read (:mod:`sparsefs.cli.copier`):

- kernel copy (``copy_file_range`` from the image, data or backing file) when
  the destination is on the same filesystem as the image file and, unless
  ``--reflink=auto``, that filesystem cannot share extents;
- read-hash-write everywhere else, and whenever the kernel refuses
  ``copy_file_range``.

Every point is written under a temporary name, settled on the storage, read
back and compared with the image's sparsefs1 digest; only then is it renamed
into place and recorded in ``SPARSEFS-SET.json`` and ``SPARSEFS-SUMS``.

Exit status: 0 when every image got its verified point, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading

from sparsefs.cli import setbackup
from sparsefs.cli.common import add_open_options, check_progress_fd, mount_table, open_options
from sparsefs.cli.mountset import open_mount_set
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.points.run import RawCopier
from sparsefs.points.set import BackupSet

# Filesystems whose storage is memory: nothing to overlap verification with.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# Filesystems where copy_file_range may share extents (reflink / block cloning /
# server-side clone) instead of writing a second copy of the bytes.
REFLINK_FILESYSTEMS = frozenset(
    {"xfs", "btrfs", "bcachefs", "ocfs2", "zfs", "nfs", "nfs4", "cifs", "smb3"}
)


class FdProgress:
    """nbdcopy-style progress for wrappers: ``N/100`` lines on a descriptor, as N grows."""

    def __init__(self, fd: int, total: int) -> None:
        self._fd = fd
        self._total = max(total, 1)
        self._done = 0
        self._last = -1
        self._lock = threading.Lock()
        self.advance(0)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            percent = min(100, self._done * 100 // self._total)
            if percent > self._last:
                self._last = percent
                with contextlib.suppress(OSError):
                    os.write(self._fd, f"{percent}/100\n".encode())

    def finish(self) -> None:
        with self._lock:
            if self._last < 100:
                self._last = 100
                with contextlib.suppress(OSError):
                    os.write(self._fd, b"100/100\n")


def filesystem_type(path: str) -> str | None:
    """The filesystem type of the mount holding ``path``, or None."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    device = f"{os.major(dev)}:{os.minor(dev)}"
    return next((e.fstype for e in mount_table() if e.device == device), None)


def _kernel_copy_allowed(source_file: str | None, dest_dir: str, reflink: str) -> bool:
    """Whether to try copy_file_range: same filesystem, and no extent sharing unless asked."""
    if source_file is None:
        return False
    try:
        if os.stat(source_file).st_dev != os.stat(dest_dir).st_dev:
            return False  # other filesystems refuse it (EXDEV) or copy through the page cache
    except OSError:
        return False
    if reflink == "auto":
        return True
    return filesystem_type(dest_dir) not in REFLINK_FILESYSTEMS


def cmd_backup(args: argparse.Namespace) -> int:
    """Run a backup; see the subcommand help."""
    if args.domain or args.connect:
        if not args.domain:
            raise SparsefsError("--connect needs --domain NAME")
        from sparsefs.cli import domain

        return domain.cmd_backup_domain(args, _raw_point_copier(args.paths[-1], args.reflink))
    if args.since and getattr(args, "snapshots", False):
        raise SparsefsError("--since cannot be combined with --snapshots")
    if args.qmp:
        from sparsefs.cli import live  # QMP's socket code: only for --qmp

        return live.dispatch(args, _backup_points)
    if args.node:
        raise SparsefsError("--node needs --qmp")
    return _backup_points(args)


def _backup_points(args: argparse.Namespace) -> int:
    """Add a point for every image (``--since``: from its bitmap)."""
    *images, dest = args.paths
    if not images:
        raise SparsefsError("backup needs at least one IMAGE and a DEST_DIR")
    if not os.path.isdir(dest):
        raise SparsefsError(f"{dest}: destination directory does not exist")
    check_progress_fd(args.progress_fd)
    if args.compress and args.format != "qcow2":
        raise SparsefsError("--compress needs --format qcow2 (deltas are never compressed)")
    with BackupSet.open(dest, lock=True, create=True) as bset:
        # Open every image first: a bad image fails the run before anything is written.
        mset = open_mount_set(images, open_options(args), snapshots=args.snapshots)
        try:
            disks = setbackup.plan_disks(images, mset, args.since)
            total = sum(d.estimate for d in disks)
            run = setbackup.Run(
                bset,
                args,
                FdProgress(args.progress_fd, total) if args.progress_fd is not None else None,
                _raw_point_copier(dest, args.reflink),
            )
            results = [setbackup.backup_disk(run, disk) for disk in disks]
            results += [
                setbackup.DiskOutcome(name.removesuffix(".raw"), None, problem)
                for name, problem in mset.damaged
            ]
            if run.fd_progress is not None:
                run.fd_progress.finish()
        finally:
            mset.close()
    return setbackup.report(results, args, dest)


def _raw_point_copier(dest: str, reflink: str) -> RawCopier:
    def kernel(source: SparseSource, where: str) -> bool:
        return _kernel_copy_allowed(_source_file(source), where, reflink)

    return setbackup.raw_copier(dest, kernel, filesystem_type(dest) not in MEMORY_FILESYSTEMS)


def _source_file(source: SparseSource) -> str | None:
    """The host file a source reads most of its data from (for the kernel-copy decision)."""
    qfile = getattr(source, "qfile", None)
    data = getattr(qfile, "data", None) if qfile is not None else source
    path = getattr(data, "path", None)
    return path if isinstance(path, str) else None


def fd_number(text: str) -> int:
    """argparse type: a file descriptor number (for --progress=FD)."""
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {text!r}") from None
    if fd < 0:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {text!r}")
    return fd


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``backup``."""
    b = sub.add_parser(
        "backup",
        help="add a verified point in time per image to the backup set in DEST_DIR",
        description="Add one point per image to the backup set in DEST_DIR (the same command "
        "every night). A disk's first point is full: DEST_DIR/NAME/NAME@ID.raw, a sparse raw "
        "copy read straight from the image's metadata (holes stay holes). Later points are "
        "deltas: DEST_DIR/NAME/NAME@ID.qcow2, a qcow2 overlay over the previous point holding "
        "only the 64 KiB blocks that changed (found from --since BITMAP, or by comparing block "
        "digests: the image's data is read, holes cost nothing). Every point is written under "
        "a temporary name, synced, its cached pages dropped, and read back; only when its "
        "digest equals the image's is it renamed into place and recorded in "
        "DEST_DIR/SPARSEFS-SET.json and DEST_DIR/SPARSEFS-SUMS (check anywhere with 'cd "
        "DEST_DIR && sparsefs checksum --check SPARSEFS-SUMS'). No run changes an earlier "
        "point. Exit status 0 when every image got its point, 1 otherwise: a systemd timer "
        "or cron can alert on it. See also 'sparsefs list' and 'sparsefs restore'.",
    )
    b.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE... DEST_DIR",
        help="images, then an existing destination directory (for a domain: DEST_DIR alone)",
    )
    b.add_argument(
        "--snapshots",
        action="store_true",
        help="also back up each internal snapshot, as disk NAME@SNAPSHOT of the set",
    )
    b.add_argument(
        "--xxh128sums",
        action="store_true",
        help="also give each new full raw point a line in DEST_DIR/XXH128SUMS for "
        "'xxh128sum -c' (hashes every zero of the virtual size: time grows with the disk "
        "size, not the data); deltas get none (their file is not the disk's bytes)",
    )
    b.add_argument(
        "--reflink",
        choices=("never", "auto"),
        default="never",
        help="'never' (default): the copy never shares extents with the image, so "
        "it survives damage to the image's blocks; 'auto': on the same XFS/btrfs "
        "filesystem, copy_file_range may share them (instant, no extra space, "
        "but not an independent copy)",
    )
    b.add_argument(
        "--progress",
        dest="progress_fd",
        type=fd_number,
        metavar="FD",
        help="write progress as 'N/100' lines to file descriptor FD (as nbdcopy "
        "--progress=FD does), for wrappers and GUIs",
    )
    b.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing but errors (no progress bar, no summary)",
    )
    b.add_argument(
        "--json", action="store_true", help="print the results as JSON, with per-phase times"
    )
    setbackup.add_arguments(b)
    _add_live_arguments(b)
    _add_domain_arguments(b)
    add_open_options(b)
    b.set_defaults(func=cmd_backup)


def _add_live_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--qmp`` and ``--node`` options of ``backup``."""
    parser.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="the image belongs to a running VM whose QMP monitor listens on SOCKET: take an "
        "external snapshot of --node, back up the frozen image, then always commit the "
        "overlay back and pivot (README 'Backing up a running VM')",
    )
    parser.add_argument(
        "--node", metavar="NODE", help="with --qmp: the block node (node-name) of the image"
    )


def _add_domain_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--domain`` and ``--connect`` options of ``backup``."""
    parser.add_argument(
        "--domain",
        metavar="NAME",
        help="back up every disk of libvirt domain NAME (running or stopped) into DEST_DIR, "
        "one point per disk named NAME-TARGET, all disks at one instant, incremental through "
        "libvirt checkpoints (README 'Backing up libvirt VMs')",
    )
    parser.add_argument(
        "--connect",
        metavar="URI",
        help="with --domain: the libvirt URI (default: libvirt's, e.g. qemu:///system)",
    )
