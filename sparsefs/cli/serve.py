"""The mount daemon: FUSE options, serving tunables, the trio main loop with its
signal handling, and the fork that returns once the mount is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TypedDict

from sparsefs.cli.common import (
    EXIT_OK,
    fail_message,
    mount_table,
)
from sparsefs.cli.mountset import MountSet
from sparsefs.errors import SparsefsError

log = logging.getLogger("sparsefs")

INSTALL_HINT = (
    "the installed pyfuse3 has no lseek handler, so holes cannot be reported; "
    "install the patched build with tools/setup (pyfuse3 3.5.0+sparsefs.lseek1.fast1)"
)


class MountError(SparsefsError):
    """The mount cannot be made (mountpoint missing, busy, dead, ...)."""


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


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


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


def serve_tuning(args: argparse.Namespace) -> _Tuning:
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
                **serve_tuning(args),
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


def add_serving_options(p: argparse.ArgumentParser) -> None:
    """The serving tunables of ``mount`` (threads, tasks, readahead, polling)."""
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="reads served at once in worker threads, for data not yet in "
        f"memory (default {DEFAULT_MAX_THREADS})",
    )
    p.add_argument(
        "--fuse-tasks",
        type=positive_int,
        metavar="N",
        help="FUSE requests handled at once (default "
        f"{DEFAULT_MAX_TASKS}); 1 costs the least per request",
    )
    p.add_argument(
        "--readahead",
        type=positive_int,
        metavar="KIB",
        help="serve every file through the kernel page cache with this readahead in KiB "
        "(set only as root); shared memory maps then work too. Default: direct I/O, "
        "every read reaches the daemon at the reader's size, up to 1 MiB, the daemon "
        "reads ahead of sequential readers, and the kernel never reads past a data "
        "extent into the hole after it",
    )
    p.add_argument(
        "--busy-poll",
        type=non_negative_int,
        metavar="USEC",
        help="after answering a request, keep polling for the next one for up to USEC "
        "microseconds before sleeping (the window shrinks by itself when requests come "
        "seldom); 0 never polls (default: 100 with two CPUs or more, else 0)",
    )
