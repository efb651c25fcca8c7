"""``sparsefs mount`` and ``sparsefs umount``: the mount lifecycle.

``mount`` opens and validates every image first (errors are printed before
anything is mounted), then mounts.  Without ``--foreground`` it forks a daemon
and returns only once the mount is ready, or with the daemon's error.  The
daemon unmounts on SIGINT, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Collection

from sparsefs.cli.common import (
    EXIT_OK,
    add_open_options,
    mount_table,
    open_options,
)
from sparsefs.cli.mountset import is_backup_set, open_mount_set, open_set_mount
from sparsefs.cli.serve import (
    INSTALL_HINT,
    MountError,
    add_serving_options,
    daemonize_and_serve,
    serve,
    serve_tuning,
)
from sparsefs.errors import SparsefsError
from sparsefs.formats import FORMAT_NAMES

log = logging.getLogger("sparsefs")

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
    if len(images) == 1 and is_backup_set(images[0]):
        files = open_set_mount(images[0], open_options(args))
    else:
        files = open_mount_set(
            images, open_options(args), snapshots=not args.no_snapshots, fmt=args.format
        )
    try:
        if args.foreground:
            serve(files, mountpoint, allow_other=args.allow_other, **serve_tuning(args))
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
        "snapshot (NAME@SNAPSHOT.raw); or, given a backup set's directory (DEST_DIR), one "
        "raw file per point of every disk (NAME@ID.raw) and the newest as NAME.raw. "
        "SEEK_DATA/SEEK_HOLE on the files come from the image's allocation metadata and "
        "st_blocks counts "
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
    add_serving_options(p)
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
