"""``sparsefs mount`` and ``sparsefs umount``: the mount lifecycle.

``mount`` opens and validates every image first (errors are printed before
anything is mounted), then mounts.  Without ``--foreground`` it forks a daemon
and returns only once the mount is ready, or with the daemon's error.  The
daemon unmounts on SIGINT, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from sparsefs.cli.common import (
    EXIT_OK,
    add_open_options,
    fail_message,
    image_stem,
    mount_table,
    open_options,
    raw_name,
    usable_in_file_name,
)
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.formats import FORMAT_NAMES, open_source
from sparsefs.formats.qcow2 import Qcow2Image
from sparsefs.options import OpenOptions

log = logging.getLogger("sparsefs")

INSTALL_HINT = (
    "the installed pyfuse3 has no lseek handler, so holes cannot be reported; "
    "install the patched build with tools/setup (pyfuse3 3.5.0+sparsefs.lseek1.fast1)"
)

# Options mount(8) and fstab pass that mean nothing here (or are implied).
_IGNORED_MOUNT_OPTIONS = {
    "ro",
    "defaults",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "_netdev",
    "nofail",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "default_permissions",
    "x-systemd.automount",
    # mount(8) passes "rw" unless told "ro"; sparsefs mounts are read-only either way.
    "rw",
}


class MountError(SparsefsError):
    """The mount cannot be made (mountpoint missing, busy, dead, ...)."""


@dataclass
class MountSet:
    """The files of a mount, by name, and what must be closed afterwards.

    ``damaged`` lists the snapshots left out because they cannot be read, as
    (file name, one-line message naming image and snapshot); a snapshot table
    that cannot be read at all is one entry named ``STEM@*.raw``.
    """

    files: dict[str, SparseSource] = field(default_factory=dict)
    mtime_ns: dict[str, int] = field(default_factory=dict)
    images: list[SparseSource] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)

    def close(self) -> None:
        for image in self.images:
            close = getattr(image, "close", None)
            if close is not None:
                close()
        self.images.clear()


MAX_FILE_NAME_BYTES = 255


def snapshot_file_names(stem: str, snapshots: Sequence[tuple[str, str]]) -> list[str]:
    """``STEM@LABEL.raw`` for each (name, id) of an image's snapshots, in table order.

    LABEL is the snapshot's name, or its id when the name cannot serve: not
    usable in a file name (empty, ``/``, control characters, too long), shared
    by several snapshots, or equal to another snapshot's id.  So LABEL is always
    the key ``qemu-img convert -l LABEL`` resolves to this very snapshot (qemu
    looks ids up before names).  A damaged table (duplicate or unusable ids)
    gets ``snapshot-N`` (N the position in the table, from 1) where needed.
    """

    def fits(label: str) -> bool:
        name = f"{stem}@{label}.raw"
        return usable_in_file_name(label) and len(name.encode()) <= MAX_FILE_NAME_BYTES

    names = [name for name, _ in snapshots]
    ids = [snap_id for _, snap_id in snapshots]
    labels = []
    for index, (name, snap_id) in enumerate(snapshots):
        other_ids = ids[:index] + ids[index + 1 :]
        if fits(name) and names.count(name) == 1 and name not in other_ids:
            labels.append(name)
        else:
            labels.append(snap_id)
    out = []
    for index, label in enumerate(labels):
        if not fits(label) or labels.count(label) > 1:
            label = f"snapshot-{index + 1}"
        out.append(f"{stem}@{label}.raw")
    return out


def open_mount_set(
    images: list[str], options: OpenOptions, *, snapshots: bool = True, fmt: str | None = None
) -> MountSet:
    """Open every image (and its snapshots) and name their files.

    Each image is opened through the format registry: as ``fmt`` when given,
    else by its magic.  Only qcow2 images have internal snapshots.

    A damaged snapshot (invalid L1 table, or an unreadable snapshot table)
    costs only itself: it is logged as a one-line warning, listed in
    ``MountSet.damaged``, and the active disk and the other snapshots are
    served.  Without ``snapshots`` the snapshot table is never read.

    Raises:
        SparsefsError: an image cannot be opened, or two files get one name.
    """
    mset = MountSet()
    try:
        for path in images:
            image = open_source(path, fmt, options)
            mset.images.append(image)
            mtime = os.stat(path).st_mtime_ns
            entries: list[tuple[str, SparseSource]] = [(raw_name(path), image)]
            if snapshots and isinstance(image, Qcow2Image):
                problem = image.snapshot_table_problem
                if problem is not None:
                    skipped = f"{image_stem(path)}@*.raw"
                    mset.damaged.append((skipped, f"{problem}; no snapshot is served"))
                names = snapshot_file_names(
                    image_stem(path), [(snap.name, snap.id_str) for snap in image.snapshots]
                )
                for snap, name in zip(image.snapshots, names, strict=True):
                    try:
                        entries.append((name, image.open_snapshot(snap)))
                    except SparsefsError as exc:
                        mset.damaged.append((name, f"{exc}; skipped {name}"))
            for name, source in entries:
                if name in mset.files:
                    raise SparsefsError(
                        f"{path}: its file name {name} is already taken by another image"
                    )
                mset.files[name] = source
                mset.mtime_ns[name] = mtime
    except BaseException:
        mset.close()
        raise
    for _, message in mset.damaged:
        log.warning("%s", message)
    return mset


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a mountpoint that is missing, not a directory, mounted, or dead."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: mountpoint does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"{mountpoint}: a dead mount is left here; run 'sparsefs umount {mountpoint}'"
            ) from None
        raise MountError(f"{mountpoint}: {exc.strerror}") from None
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode):
        raise MountError(f"{mountpoint}: mountpoint is not a directory")
    if os.path.ismount(mountpoint):
        if _is_dead_mount(mountpoint):  # stat may still answer from the kernel's cache
            raise MountError(
                f"{mountpoint}: a dead mount is left here; run 'sparsefs umount {mountpoint}'"
            )
        raise MountError(f"{mountpoint}: mountpoint is busy (already a mount point)")


def _is_dead_mount(mountpoint: str) -> bool:
    """True when a FUSE mount is left at ``mountpoint`` whose daemon is gone.

    statfs always reaches the daemon (nothing caches it), so a dead
    connection answers ENOTCONN (or ECONNABORTED once aborted).
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def fuse_options(*, allow_other: bool, fsname: str) -> set[str]:
    """The FUSE mount options: read-only, kernel permission checks."""
    opts = {"ro", "default_permissions", "subtype=sparsefs", f"fsname={fsname}"}
    if allow_other:
        opts.add("allow_other")
    return opts


DEFAULT_MAX_THREADS = 8
DEFAULT_MAX_TASKS = 99


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def default_busy_poll_us() -> int:
    """The FUSE loop's polling window: 100 µs with two CPUs or more, else none.

    Files are served with direct_io, so a reader that reads one request after
    the other (cp, cat, rsync) waits for each answer, and the daemon, woken
    from the event loop for each request, adds a sleep and a wake-up to every
    round trip.  Polling the FUSE device for a while after each answer keeps
    the daemon awake for the reader's next request (W1: cp 0.60 s -> 0.46 s).
    The window shrinks by itself when requests come seldom.  With one CPU the
    daemon would only take it from the reader.
    """
    return 100 if len(os.sched_getaffinity(0)) >= 2 else 0


def mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the last mount at ``mountpoint`` (a real path), or None."""
    found = [e.device for e in mount_table() if e.mountpoint == mountpoint]
    return found[-1] if found else None


def set_readahead(mountpoint: str, kib: int) -> None:
    """Set the kernel readahead of the mount at ``mountpoint`` (a real path) when permitted.

    Writes /sys/class/bdi/MAJOR:MINOR/read_ahead_kb, which only root may; it
    must happen after FUSE_INIT is answered (the kernel sets the readahead
    then).  Without permission the kernel default stays; nothing fails.
    """
    dev = mount_device(mountpoint)
    if dev is None:
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        log.debug("%s: readahead left as is: %s", path, exc.strerror)


def serve(
    files: MountSet,
    mountpoint: str,
    *,
    allow_other: bool = False,
    max_threads: int = 8,
    max_tasks: int = 99,
    readahead_kib: int | None = None,
    busy_poll_us: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount, serve until unmounted or signalled, unmount.  Blocks.

    ``max_threads`` bounds the reads served at once in worker threads (those
    not in memory); ``max_tasks`` bounds the FUSE requests handled at once
    (pyfuse3 worker tasks; 1 answers one request at a time, with the least
    overhead per request); ``readahead_kib`` serves every file through the
    page cache with that kernel readahead (set when permitted: root), None
    with ``direct_io`` (no page cache, no kernel readahead; the daemon reads
    ahead); ``busy_poll_us`` is the FUSE loop's polling window (pyfuse3's
    ``busy_poll_us``; None: :func:`default_busy_poll_us`, 0: never poll).
    """
    import pyfuse3
    import trio

    from sparsefs.fusefs import SparseFS, has_lseek_support

    if not has_lseek_support():
        raise SparsefsError(INSTALL_HINT)
    real_mountpoint = os.path.realpath(mountpoint)  # now, while it is a plain directory

    def after_init() -> None:
        if readahead_kib is not None:
            set_readahead(real_mountpoint, readahead_kib)

    ops = SparseFS(
        files.files,
        mtime_ns=files.mtime_ns,
        max_threads=max_threads,
        after_init=after_init,
        page_cache=readahead_kib is not None,
    )
    ops.precompute()
    if busy_poll_us is None:
        busy_poll_us = default_busy_poll_us()
    first = getattr(files.images[0], "path", "sparsefs") if len(files.images) == 1 else None
    fsname = first.replace(",", "_") if first is not None else "sparsefs"
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(allow_other=allow_other, fsname=fsname))
    except RuntimeError as exc:
        raise MountError(f"{mountpoint}: mount failed: {exc}") from None
    try:
        if on_ready is not None:
            on_ready()
        trio.run(_main_loop, max_tasks, busy_poll_us)
    finally:
        pyfuse3.close(unmount=True)


async def _main_loop(max_tasks: int = 99, busy_poll_us: int = 0) -> None:
    import pyfuse3
    import trio

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            task_status.started()
            async for signum in sigs:
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks, busy_poll_us=busy_poll_us)
        nursery.cancel_scope.cancel()


def _daemon_logging(log_file: str | None) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s sparsefs[%(process)d]: %(message)s"))
    elif os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # only the daemon logs to syslog

        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("sparsefs[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


class _Tuning(TypedDict):
    max_threads: int
    max_tasks: int
    readahead_kib: int | None
    busy_poll_us: int | None


def _serve_tuning(args: argparse.Namespace) -> _Tuning:
    """The :func:`serve` tuning the mount arguments ask for."""
    return {
        "max_threads": getattr(args, "threads", None) or DEFAULT_MAX_THREADS,
        "max_tasks": getattr(args, "fuse_tasks", None) or DEFAULT_MAX_TASKS,
        "readahead_kib": getattr(args, "readahead", None),
        "busy_poll_us": getattr(args, "busy_poll", None),
    }


def daemonize_and_serve(files: MountSet, mountpoint: str, args: argparse.Namespace) -> int:
    """Fork a daemon that mounts; return once the mount is ready (0) or failed (1)."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        status = 0
        try:
            os.setsid()
            _redirect_stdio()
            _daemon_logging(args.log_file)

            def ready() -> None:
                os.write(write_fd, b"ok\n")
                os.close(write_fd)

            serve(
                files,
                mountpoint,
                allow_other=args.allow_other,
                on_ready=ready,
                **_serve_tuning(args),
            )
        except BaseException as exc:  # report to the parent if it still listens
            status = 1
            with contextlib.suppress(OSError):
                os.write(write_fd, (fail_message(exc) + "\n").encode())
            log.error("%s", fail_message(exc))
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            chunk = pipe.read(4096)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\n" in chunk:
                break
    message = b"".join(chunks).decode(errors="replace").strip()
    if message == "ok":
        return EXIT_OK
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    print(message or f"sparsefs: {mountpoint}: the mount daemon died", file=sys.stderr)
    return 1


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount images; see the subcommand help."""
    from sparsefs.fusefs import has_lseek_support

    paths: list[str] = args.paths
    if len(paths) < 2:
        raise SparsefsError("mount needs at least one IMAGE and a MOUNTPOINT")
    *images, mountpoint = paths
    if not has_lseek_support():
        raise SparsefsError(INSTALL_HINT)
    check_mountpoint(mountpoint)
    files = open_mount_set(
        images, open_options(args), snapshots=not args.no_snapshots, fmt=args.format
    )
    try:
        if args.foreground:
            serve(files, mountpoint, allow_other=args.allow_other, **_serve_tuning(args))
            return EXIT_OK
        return daemonize_and_serve(files, mountpoint, args)
    finally:
        files.close()


def unmount(mountpoint: str) -> None:
    """Unmount a sparsefs mount, also one whose daemon died.

    Raises:
        MountError: nothing is mounted there, or the mount is busy.
    """
    mounted = _is_fuse_mount(mountpoint)
    if not mounted:
        raise MountError(f"{mountpoint}: not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    errors = []
    # A dead mount serves nothing: files still open on it only get errors, so
    # it is detached lazily rather than refused as busy.
    dead = _is_dead_mount(mountpoint)
    if tool:
        for flags in (["-u"], ["-u", "-z"]) if dead else (["-u"],):
            proc = subprocess.run([tool, *flags, mountpoint], capture_output=True, text=True)
            if proc.returncode == 0:
                return
            errors.append(proc.stderr.strip())
    if os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", "-l", mountpoint] if dead else ["umount", mountpoint]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        errors.append(proc.stderr.strip())
    detail = "; ".join(e.splitlines()[-1] for e in errors if e) or "unmount failed"
    raise MountError(f"{mountpoint}: cannot unmount: {detail}")


def _is_fuse_mount(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    return any(e.mountpoint == target and e.fstype.startswith("fuse") for e in mount_table())


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount; see the subcommand help."""
    unmount(args.mountpoint)
    return EXIT_OK


def rewrite_mount_helper_form(argv: list[str], commands: Collection[str]) -> list[str]:
    """Turn mount.fuse3's ``IMAGE MOUNTPOINT -o opts`` call into ``mount ...`` arguments.

    mount.fuse3 runs ``sparsefs SOURCE MOUNTPOINT -o OPTIONS``.  Anything
    whose first word is a subcommand (one of ``commands``) or an option is
    returned unchanged.
    """
    if not argv or argv[0].startswith("-") or argv[0] in commands:
        return argv
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for word in it:
        if word == "-o":
            options.extend(next(it, "").split(","))
        elif word.startswith("-o") and len(word) > 2:
            options.extend(word[2:].split(","))
        else:
            positional.append(word)
    if len(positional) != 2:
        return argv  # not the helper form: let argparse name the unknown command
    out = ["mount"]
    for opt in filter(None, options):
        key, _, value = opt.partition("=")
        if key in _IGNORED_MOUNT_OPTIONS:
            continue
        if key in ("allow_other", "no_backing", "force", "force_share", "no_snapshots"):
            out.append("--" + key.replace("_", "-"))
        elif (
            key
            in (
                "backing_dir",
                "log_file",
                "threads",
                "fuse_tasks",
                "readahead",
                "busy_poll",
                "l2_cache_mib",
                "compressed_cache_mib",
                "format",
            )
            and value
        ):
            out.extend(["--" + key.replace("_", "-"), value])
        else:
            raise SystemExit(f"sparsefs: unknown mount option {opt!r}")
    return out + positional


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``mount`` and ``umount``."""
    p = sub.add_parser(
        "mount",
        help="mount images as sparse raw files",
        description="Mount images (qcow2, vmdk, vhdx, vpc, vdi, raw) read-only as a directory "
        "holding one raw file per image (NAME.qcow2 -> NAME.raw) and one per internal qcow2 "
        "snapshot (NAME@SNAPSHOT.raw). SEEK_DATA/SEEK_HOLE on the files come from the "
        "image's allocation metadata and st_blocks counts "
        "the stored data, so hole-aware copiers skip what is not stored. Returns once the "
        "mount is ready; unmount with 'sparsefs umount MOUNTPOINT'.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE... MOUNTPOINT",
        help="one or more images, then the mountpoint (an existing directory)",
    )
    p.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        help="read every IMAGE as this format (default: probed by magic, raw when none matches)",
    )
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground until unmounted (Ctrl-C unmounts)",
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users see the mount (needs user_allow_other in "
        "/etc/fuse.conf when not root); permissions are still checked",
    )
    p.add_argument(
        "--no-snapshots",
        action="store_true",
        help="do not present internal snapshots as NAME@SNAPSHOT.raw",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="reads served at once in worker threads, for data not yet in "
        f"memory (default {DEFAULT_MAX_THREADS})",
    )
    p.add_argument(
        "--fuse-tasks",
        type=_positive_int,
        metavar="N",
        help="FUSE requests handled at once (default "
        f"{DEFAULT_MAX_TASKS}); 1 costs the least per request",
    )
    p.add_argument(
        "--readahead",
        type=_positive_int,
        metavar="KIB",
        help="serve every file through the kernel page cache with this readahead in KiB "
        "(set only as root); shared memory maps then work too. Default: direct I/O, "
        "every read reaches the daemon at the reader's size, up to 1 MiB, the daemon "
        "reads ahead of sequential readers, and the kernel never reads past a data "
        "extent into the hole after it",
    )
    p.add_argument(
        "--busy-poll",
        type=_non_negative_int,
        metavar="USEC",
        help="after answering a request, keep polling for the next one for up to USEC "
        "microseconds before sleeping (the window shrinks by itself when requests come "
        "seldom); 0 never polls (default: 100 with two CPUs or more, else 0)",
    )
    p.add_argument("--log-file", metavar="FILE", help="where the daemon logs (default: syslog)")
    add_open_options(p)
    p.set_defaults(func=cmd_mount)

    u = sub.add_parser(
        "umount",
        help="unmount a sparsefs mount",
        description="Unmount a sparsefs mount, also one left behind by a daemon that died.",
    )
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.set_defaults(func=cmd_umount)
