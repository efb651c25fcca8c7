"""``sparsefs backup``: copy each image straight from its reader, verify, record checksums.

No FUSE mount is involved.  For each image (and, with ``--snapshots``, each
internal snapshot), ``DEST_DIR/NAME.raw`` is written under a temporary name
(``.NAME.raw.partial-PID``) from the one extent walk of the image: holes stay
holes, and only stored data is read (:mod:`sparsefs.cli.copier`):

- kernel copy (``copy_file_range`` from the image, data or backing file) when
  the destination is on the same filesystem as the image file and, unless
  ``--reflink=auto``, that filesystem cannot share extents;
- read-hash-write everywhere else, and whenever the kernel refuses
  ``copy_file_range``.

The image's digest is computed while copying.  The copy is settled on the
storage range by range (synced, cached pages dropped), and a second thread
digests it behind the copy by reading it back through its own holes: what the
storage holds, never the bytes that were written.  Only equal digests rename
it into place (after an fsync) and update ``SPARSEFS-SUMS`` (and
``XXH128SUMS`` with ``--xxh128sums``: that must hash every zero of the virtual
size, so it is opt-in), atomically, keeping other files' lines.

Exit status: 0 when every file was copied and verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from sparsefs.checksum import compare, stream_xxh128
from sparsefs.cli import incremental
from sparsefs.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    add_open_options,
    fail_message,
    mount_table,
    open_options,
)
from sparsefs.cli.copier import CopyFailed, copy_and_verify
from sparsefs.cli.mountset import open_mount_set
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource, data_size
from sparsefs.progress import Progress, human_bytes, human_duration
from sparsefs.raw import RawFile

SPARSEFS_SUMS = "SPARSEFS-SUMS"
XXH128_SUMS = "XXH128SUMS"
# Filesystems whose storage is memory: nothing to overlap verification with.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# Filesystems where copy_file_range may share extents (reflink / block cloning /
# server-side clone) instead of writing a second copy of the bytes.
REFLINK_FILESYSTEMS = frozenset(
    {"xfs", "btrfs", "bcachefs", "ocfs2", "zfs", "nfs", "nfs4", "cifs", "smb3"}
)


@dataclass
class Result:
    """What happened to one file."""

    name: str
    ok: bool
    size: int = 0
    data_bytes: int = 0
    seconds: float = 0.0
    digest: str | None = None
    xxh128: str | None = None
    error: str | None = None
    method: str | None = None
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.name,
            "ok": self.ok,
            "size": self.size,
            "data-bytes": self.data_bytes,
            "seconds": round(self.seconds, 3),
            "sparsefs1": self.digest,
            "xxh128": self.xxh128,
            "copy-method": self.method,
            "phase-seconds": {k: round(v, 3) for k, v in self.phases.items()},
            "error": self.error,
        }


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


@dataclass
class _Run:
    """Settings of one backup run."""

    dest: str
    reflink: str
    xxh128sums: bool
    quiet: bool
    bar_enabled: bool | None  # None: draw when stderr is a terminal
    fd_progress: FdProgress | None
    overlap: bool  # verify behind the copy (copier.copy_and_verify)


def cmd_backup(args: argparse.Namespace) -> int:
    """Run a backup; see the subcommand help."""
    if args.since or args.qmp or args.node:  # incremental.py, live.py
        from sparsefs.cli import live

        return live.dispatch(args, _backup_full)
    return _backup_full(args)


def _backup_full(args: argparse.Namespace) -> int:
    """A full backup of every image."""
    *images, dest = args.paths
    if not images:
        raise SparsefsError("backup needs at least one IMAGE and a DEST_DIR")
    if not os.path.isdir(dest):
        raise SparsefsError(f"{dest}: destination directory does not exist")
    if args.progress_fd is not None:
        try:
            os.fstat(args.progress_fd)
        except OSError:
            raise SparsefsError(
                f"--progress={args.progress_fd}: not an open file descriptor"
            ) from None
    options = open_options(args)
    # Open every image first: a bad image fails the run before anything is copied.
    mset = open_mount_set(images, options, snapshots=args.snapshots)
    results: list[Result] = []
    manifest_seconds = 0.0
    try:
        files = [(name, source, data_size(source)) for name, source in mset.files.items()]
        total = sum(2 * data for _, _, data in files)
        run = _Run(
            dest,
            args.reflink,
            args.xxh128sums,
            args.quiet or args.json,
            False if args.quiet else None,
            FdProgress(args.progress_fd, total) if args.progress_fd is not None else None,
            filesystem_type(dest) not in MEMORY_FILESYSTEMS,
        )
        for name, source, data in files:
            results.append(_backup_one(name, source, data, run))
        results += [Result(name, ok=False, error=problem) for name, problem in mset.damaged]
        t0 = time.monotonic()
        sums = {r.name: r.digest for r in results if r.ok and r.digest}
        if sums:
            incremental.update_manifest(os.path.join(dest, SPARSEFS_SUMS), dict(sums))
            xsums = {r.name: r.xxh128 for r in results if r.ok and r.xxh128}
            # Without --xxh128sums, an existing XXH128SUMS loses the replaced files' lines.
            incremental.update_manifest(
                os.path.join(dest, XXH128_SUMS),
                dict(xsums) if args.xxh128sums else dict.fromkeys(sums),
            )
            incremental.fsync_dir(dest)
        manifest_seconds = time.monotonic() - t0
        if run.fd_progress is not None:
            run.fd_progress.finish()
    finally:
        mset.close()
    failed = [r for r in results if not r.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not failed,
                    "files": [r.as_dict() for r in results],
                    "manifest-seconds": round(manifest_seconds, 3),
                },
                indent=2,
            )
        )
    elif not args.quiet:
        data = sum(r.data_bytes for r in results if r.ok)
        secs = sum(r.seconds for r in results)
        print(
            f"backup: {len(results) - len(failed)} of {len(results)} files copied and "
            f"verified to {dest}, {human_bytes(data)} of data in {human_duration(secs)}"
        )
    return EXIT_FAILURE if failed else EXIT_OK


def _source_file(source: SparseSource) -> str | None:
    """The host file a source reads most of its data from (for the kernel-copy decision)."""
    qfile = getattr(source, "qfile", None)
    data = getattr(qfile, "data", None) if qfile is not None else source
    path = getattr(data, "path", None)
    return path if isinstance(path, str) else None


def _raise_mismatch(source: SparseSource, partial: str) -> None:
    """Raise CopyFailed naming where the copy ``partial`` first differs from ``source``."""
    with RawFile(partial) as copy:
        difference, _ = compare(source, copy)
    where = (
        f"at byte {difference.offset}"
        if difference and difference.offset is not None
        else "in length"
    )
    raise CopyFailed(
        f"verification failed: the copy differs from the image {where}; no file written"
    )


def _stream_hash(partial: str, result: Result, bar_enabled: bool) -> None:
    """Fill ``result.xxh128`` with the stream XXH128 of the copy (``--xxh128sums``)."""
    t2 = time.monotonic()
    with (
        RawFile(partial) as copy,
        Progress(copy.size, label=f"{result.name} xxh128", enabled=bar_enabled) as xbar,
    ):
        result.xxh128 = stream_xxh128(copy, progress=xbar.update if xbar.enabled else None).digest
    result.phases["xxh128"] = time.monotonic() - t2


def _backup_one(name: str, source: SparseSource, data: int, run: _Run) -> Result:
    """Copy, verify and rename one file; ``data`` is its stored bytes (``data_size``)."""
    final = os.path.join(run.dest, name)
    partial = os.path.join(run.dest, f".{name}.partial-{os.getpid()}")
    result = Result(name, ok=False, size=source.size)
    bar = Progress(2 * data, label=name, enabled=run.bar_enabled)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.advance(n)
        if run.fd_progress is not None:
            run.fd_progress.advance(n)

    t0 = time.monotonic()
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        with contextlib.suppress(FileNotFoundError):  # about to be replaced
            os.unlink(incremental.blocks_path(run.dest, name))
        kernel = _kernel_copy_allowed(_source_file(source), run.dest, run.reflink)
        with bar:
            bar.label = f"{name} copy+verify"
            outcome = copy_and_verify(
                source, partial, kernel=kernel, overlap=run.overlap, advance=advance
            )
            result.method = outcome.method
            result.phases.update(outcome.phases)
            if outcome.copy.digest != outcome.image.digest:
                _raise_mismatch(source, partial)
            if run.xxh128sums:
                _stream_hash(partial, result, bar.enabled)
        os.replace(partial, final)
        # The verified copy's block digests, for the next 'backup --since'.
        incremental.store_blocks(
            incremental.blocks_path(run.dest, name),
            os.stat(final),
            outcome.copy.digest,
            outcome.block_digests,
            _source_file(source),
        )
        result.ok = True
        result.digest = outcome.image.digest
        result.data_bytes = os.stat(final).st_blocks * 512
    except CopyFailed as exc:
        result.error = f"{final}: {exc}"
    except (SparsefsError, OSError) as exc:
        if isinstance(exc, OSError) and not exc.filename:
            result.error = f"{final}: copy failed: {exc.strerror or exc}"
        else:  # names the image and the problem
            result.error = f"{final}: not written: " + fail_message(exc).removeprefix("sparsefs: ")
    if not result.ok:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    result.seconds = time.monotonic() - t0
    bar.close()
    if not result.ok:
        print(f"sparsefs: {result.error}", file=sys.stderr)
    elif not run.quiet:
        print(
            f"{name}: {human_bytes(result.data_bytes)} of {human_bytes(result.size)} copied "
            f"and verified in {human_duration(result.seconds)}  {result.digest}"
        )
    return result


def _fd(text: str) -> int:
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
        help="back up images to raw files, skipping holes, verified, with a checksum manifest",
        description="Copy each image to DEST_DIR/NAME.raw straight from its metadata, reading "
        "only the stored data (holes stay holes). Each copy is synced, its cached pages "
        "dropped, and read back from the storage; only when its digest equals the image's "
        "is it renamed into place and recorded in DEST_DIR/SPARSEFS-SUMS (check anywhere "
        "with 'cd DEST_DIR && sparsefs checksum --check SPARSEFS-SUMS'). Copies are written "
        "under a temporary name, so a failed run never leaves a file that looks complete. "
        "Shows a progress bar on a terminal, one summary line per file otherwise. Exit "
        "status 0 when every file was copied and verified, 1 otherwise: a systemd timer or "
        "cron can alert on it.",
    )
    b.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE... DEST_DIR",
        help="images, then an existing destination directory",
    )
    b.add_argument(
        "--snapshots",
        action="store_true",
        help="also back up each internal snapshot as NAME@SNAPSHOT.raw",
    )
    b.add_argument(
        "--xxh128sums",
        action="store_true",
        help="also write DEST_DIR/XXH128SUMS for 'xxh128sum -c' (hashes every zero "
        "of the virtual size: time grows with the disk size, not the data)",
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
        type=_fd,
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
    from sparsefs.cli import incremental, live

    incremental.add_arguments(b)
    live.add_arguments(b)
    add_open_options(b)
    b.set_defaults(func=cmd_backup)
