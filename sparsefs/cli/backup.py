"""``sparsefs backup``: mount, copy skipping holes, verify, record checksums, unmount.

For each image, ``DEST_DIR/NAME.raw`` is written under a temporary name
(``.NAME.raw.partial-PID``), copied from the mount by a SEEK_DATA/SEEK_HOLE
loop (``copy_file_range`` where the kernel allows, else reads and writes that
leave all-zero chunks as holes), synced, verified block by block against the
image read directly (not through the mount), and only then renamed.  The
manifests ``SPARSEFS-SUMS`` (sparsefs1 digests, for ``sparsefs checksum
--check``) and ``XXH128SUMS`` (for ``xxh128sum -c``) beside the copies are
updated atomically, keeping the lines of other files.

Exit status: 0 when every image was copied and verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sparsefs.checksum import compare, stream_xxh128
from sparsefs.cli.checksum import format_line, parse_manifest_line
from sparsefs.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    add_open_options,
    fail_message,
    open_options,
)
from sparsefs.cli.mount import MountError, open_mount_set, unmount
from sparsefs.errors import SparsefsError
from sparsefs.extents import data_size
from sparsefs.progress import Progress, human_bytes, human_duration
from sparsefs.raw import RawFile

SPARSEFS_SUMS = "SPARSEFS-SUMS"
XXH128_SUMS = "XXH128SUMS"
COPY_CHUNK = 8 * 1024 * 1024
_ZERO_CHUNK = bytes(COPY_CHUNK)


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

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.name, "ok": self.ok, "size": self.size, "data-bytes": self.data_bytes,
            "seconds": round(self.seconds, 3), "sparsefs1": self.digest, "xxh128": self.xxh128,
            "error": self.error,
        }


class _CopyFailed(SparsefsError):
    pass


def _mount_private(images: list[str], args: argparse.Namespace, mountpoint: str) -> None:
    cmd = [sys.executable, "-m", "sparsefs", "mount"]
    if args.no_backing:
        cmd.append("--no-backing")
    if args.backing_dir:
        cmd += ["--backing-dir", args.backing_dir]
    if args.force:
        cmd.append("--force")
    if getattr(args, "force_share", False):
        cmd.append("--force-share")
    if not args.snapshots:
        cmd.append("--no-snapshots")
    proc = subprocess.run([*cmd, *images, mountpoint], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise SparsefsError(lines[-1].removeprefix("sparsefs: ") if lines else "mount failed")


@contextlib.contextmanager
def _private_mount(images: list[str], args: argparse.Namespace) -> Iterator[str]:
    mountpoint = tempfile.mkdtemp(prefix="sparsefs-backup-")
    try:
        _mount_private(images, args, mountpoint)
        try:
            yield mountpoint
        finally:
            for _ in range(50):
                try:
                    unmount(mountpoint)
                    break
                except MountError as exc:
                    if "not mounted" in str(exc):
                        break
                    time.sleep(0.1)  # busy for a moment after the last close
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)


def _copy_range(src: int, dst: int, start: int, end: int, state: dict[str, bool],
                bar: Progress) -> None:
    pos = start
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        if state["copy_file_range"]:
            try:
                done = os.copy_file_range(src, dst, n, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                state["copy_file_range"] = False
                continue
            if done == 0:
                raise _CopyFailed(f"unexpected end of data at byte {pos}")
        else:
            buf = os.pread(src, n, pos)
            done = len(buf)
            if done == 0:
                raise _CopyFailed(f"unexpected end of data at byte {pos}")
            if buf != _ZERO_CHUNK[:done]:  # all-zero chunks stay holes
                view = memoryview(buf)
                written = 0
                while written < done:
                    written += os.pwrite(dst, view[written:], pos + written)
        pos += done
        bar.advance(done)


def copy_sparse(src_path: str, dst_path: str, bar: Progress) -> None:
    """Copy ``src_path`` to a new ``dst_path``, reading only the data SEEK_DATA reports.

    Raises:
        OSError: reading, writing or seeking failed (EIO from the mount included).
    """
    src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dst, size)
            state = {"copy_file_range": True}
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(src, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                hole = os.lseek(src, data, os.SEEK_HOLE)
                _copy_range(src, dst, data, hole, state, bar)
                pos = hole
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _update_manifest(path: str, entries: dict[str, str]) -> None:
    """Rewrite a manifest atomically: our names get new lines, other lines stay."""
    kept: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            entry = parse_manifest_line(line)
            if entry is not None and entry.name in entries:
                continue
            if line:
                kept.append(line)
    lines = kept + [format_line(digest, name) for name, digest in sorted(entries.items())]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_backup(args: argparse.Namespace) -> int:
    """Run a backup; see the subcommand help."""
    *images, dest = args.paths
    if not images:
        raise SparsefsError("backup needs at least one IMAGE and a DEST_DIR")
    if not os.path.isdir(dest):
        raise SparsefsError(f"{dest}: destination directory does not exist")
    options = open_options(args)
    # Open every image first: a bad image fails the run before anything is copied.
    mset = open_mount_set(images, options, snapshots=args.snapshots)
    results: list[Result] = []
    quiet = args.quiet
    try:
        enabled = False if quiet else None  # None: draw when stderr is a terminal
        with _private_mount(images, args) as mountpoint:
            for name, source in mset.files.items():
                results.append(_backup_one(name, source, mountpoint, dest, enabled, quiet))
        results += [Result(name, ok=False, error=problem) for name, problem in mset.damaged]
        sums = {r.name: r.digest for r in results if r.ok and r.digest}
        xsums = {r.name: r.xxh128 for r in results if r.ok and r.xxh128}
        if sums:
            _update_manifest(os.path.join(dest, SPARSEFS_SUMS), sums)
            _update_manifest(os.path.join(dest, XXH128_SUMS), xsums)
            _fsync_dir(dest)
    finally:
        mset.close()
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"ok": not failed, "files": [r.as_dict() for r in results]}, indent=2))
    elif not quiet:
        data = sum(r.data_bytes for r in results if r.ok)
        secs = sum(r.seconds for r in results)
        print(f"backup: {len(results) - len(failed)} of {len(results)} files copied and "
              f"verified to {dest}, {human_bytes(data)} of data in {human_duration(secs)}")
    return EXIT_FAILURE if failed else EXIT_OK


def _backup_one(name: str, source: object, mountpoint: str, dest: str,
                enabled: bool | None, quiet: bool) -> Result:
    from sparsefs.extents import SparseSource

    assert isinstance(source, SparseSource)
    final = os.path.join(dest, name)
    partial = os.path.join(dest, f".{name}.partial-{os.getpid()}")
    result = Result(name, ok=False, size=source.size)
    bar = Progress(data_size(source), label=f"{name} copy", enabled=enabled)
    t0 = time.monotonic()
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        with bar:
            copy_sparse(os.path.join(mountpoint, name), partial, bar)
        with RawFile(partial) as copy:
            # Verification reads the image directly (not the mount) and the copy.
            with Progress(source.size, label=f"{name} verify", enabled=bar.enabled) as vbar:
                difference, digest = compare(source, copy,
                                             progress=vbar.update if vbar.enabled else None)
            if difference is not None or digest is None:
                where = (f"at byte {difference.offset}" if difference and difference.offset
                         is not None else "in length")
                raise _CopyFailed(f"verification failed: the copy differs from the image {where}; "
                                  "no file written")
            with Progress(copy.size, label=f"{name} xxh128", enabled=bar.enabled) as xbar:
                xxh = stream_xxh128(copy, progress=xbar.update if xbar.enabled else None)
        os.replace(partial, final)
        result.ok = True
        result.digest = digest.digest
        result.xxh128 = xxh.digest
        result.data_bytes = os.stat(final).st_blocks * 512
    except _CopyFailed as exc:
        result.error = f"{final}: {exc}"
    except (SparsefsError, OSError) as exc:
        result.error = fail_message(exc).removeprefix("sparsefs: ")
        if isinstance(exc, OSError) and not exc.filename:
            result.error = f"{final}: copy failed: {exc.strerror or exc}"
    if not result.ok:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    result.seconds = time.monotonic() - t0
    bar.close()
    if not result.ok:
        print(f"sparsefs: {result.error}", file=sys.stderr)
    elif not quiet:
        print(f"{name}: {human_bytes(result.data_bytes)} of {human_bytes(result.size)} copied "
              f"and verified in {human_duration(result.seconds)}  {result.digest}")
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``backup``."""
    b = sub.add_parser(
        "backup",
        help="back up images to raw files, skipping holes, verified, with checksum manifests",
        description="Mount the images privately, copy each to DEST_DIR/NAME.raw reading only "
        "the stored data (holes stay holes), verify every copy against its image, and record "
        "DEST_DIR/SPARSEFS-SUMS (check with 'cd DEST_DIR && sparsefs checksum --check "
        "SPARSEFS-SUMS') and DEST_DIR/XXH128SUMS (check with 'cd DEST_DIR && xxh128sum -c "
        "XXH128SUMS'). Copies are written under a temporary name and renamed only once "
        "verified, so a failed run never leaves a file that looks complete. Shows a progress "
        "bar on a terminal, one summary line per file otherwise. Exit status 0 when every "
        "file was copied and verified, 1 otherwise: a systemd timer or cron can alert on it.",
    )
    b.add_argument("paths", nargs="+", metavar="IMAGE... DEST_DIR",
                   help="qcow2 images, then an existing destination directory")
    b.add_argument("--snapshots", action="store_true",
                   help="also back up each internal snapshot as NAME@SNAPSHOT.raw")
    b.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but errors (no progress bar, no summary)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    add_open_options(b)
    b.set_defaults(func=cmd_backup)
