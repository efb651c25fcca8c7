"""``sparsefs backup --qmp SOCKET --node NODE``: back up the disk of a running VM safely.

The flow (README "Backing up a running VM"): over QEMU's monitor, put an
external snapshot overlay on top of NODE (``blockdev-snapshot-sync``), so the
VM writes to the overlay and the image file under NODE stops changing; back
it up like any image (no --force-share needed: QEMU now only reads it); then
commit the overlay back and pivot (``block-commit`` + ``job-complete``) and
delete the overlay file.  With ``--since BITMAP`` the bitmap is rotated over
QMP as well (see :func:`snapshot_for_backup`).  The commit is always attempted, after a failed
backup, after Ctrl-C and after SIGTERM too; Ctrl-C during the commit itself
is ignored.  The monitor connection is held only for the snapshot and the
commit (a monitor serves one client at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from sparsefs.errors import SparsefsError
from sparsefs.qmp import QMPClient, QMPError

COMMIT_TIMEOUT = 3600.0


def _node_file(qmp: QMPClient, node: str) -> str:
    """The qcow2 image file QEMU has open under format node ``node``.

    Raises:
        QMPError: no such node, or it is not a qcow2 format node (a protocol
            node such as ``file`` names the same file but must not be snapshotted).
    """
    for entry in qmp.execute("query-named-block-nodes"):
        if entry.get("node-name") == node:
            if entry.get("drv") != "qcow2":
                raise QMPError(
                    f"{qmp.path}: QEMU's node {node!r} is a {entry.get('drv')!r} node, not the "
                    "qcow2 format node of the image"
                )
            return str(entry.get("file", ""))
    raise QMPError(f"{qmp.path}: QEMU has no block node named {node!r}")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@dataclass
class LiveRun:
    """The snapshot window of one run.

    Attributes:
        overlay: the overlay file the VM writes to meanwhile.
        rotate: set by the caller once ``--since`` copied and verified: then
            the bitmap is reset to the writes made since the snapshot.
    """

    overlay: str
    rotate: bool = False


@contextlib.contextmanager
def snapshot_for_backup(
    socket_path: str, node: str, image_path: str, bitmap: str | None = None
) -> Iterator[LiveRun]:
    """Freeze ``image_path`` (the image under ``node``) for the ``with`` body.

    With ``bitmap`` (``--since``), a temporary bitmap is added to ``node`` in
    the same transaction as the snapshot.  It records what the commit writes
    back (the VM's writes during the window) and everything after.  When the
    body set ``rotate``, after the commit ``bitmap`` is cleared and that
    temporary bitmap merged into it in one transaction, so ``bitmap`` holds
    exactly the writes since the snapshot: the next ``--since`` run takes
    over from this one.  Otherwise ``bitmap`` is left as it was (it then holds
    more than needed, never less).

    Raises:
        QMPError: the monitor is unreachable, ``node`` is not ``image_path``,
            QEMU refused the snapshot, or the commit failed (the message says
            which overlay the VM still runs on).
    """
    pid = os.getpid()
    overlay = os.path.join(
        os.path.dirname(os.path.abspath(image_path)),
        f".{os.path.basename(image_path)}.sparsefs-overlay-{pid}.qcow2",
    )
    overlay_node = f"sparsefs-overlay-{pid}"
    window = f"{bitmap}.sparsefs-window-{pid}" if bitmap else None
    run = LiveRun(overlay)
    # Ctrl-C and SIGTERM are held off from the snapshot until the try below is
    # entered: an interrupt in between would skip the commit.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _snapshot(socket_path, node, image_path, overlay, overlay_node, window)
    except BaseException:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        raise
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, old_int)
        yield run
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _commit(socket_path, overlay_node, overlay, node, bitmap, window, run.rotate)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


def _snapshot(
    socket_path: str,
    node: str,
    image_path: str,
    overlay: str,
    overlay_node: str,
    window: str | None,
) -> None:
    with QMPClient(socket_path) as qmp:
        current = _node_file(qmp, node)
        if os.path.realpath(current) != os.path.realpath(image_path):
            raise QMPError(f"{image_path}: QEMU's node {node!r} is {current!r}, not this image")
        if os.path.exists(overlay):
            raise SparsefsError(f"{overlay}: exists already (left by another run?)")
        snap = {
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": node,
                "snapshot-file": overlay,
                "snapshot-node-name": overlay_node,
                "format": "qcow2",
            },
        }
        actions: list[dict[str, Any]] = [snap]
        if window is not None:
            actions.insert(
                0,
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": window, "persistent": False},
                },
            )
        qmp.execute("transaction", actions=actions)


def _commit(
    socket_path: str,
    overlay_node: str,
    overlay: str,
    node: str,
    bitmap: str | None,
    window: str | None,
    rotate: bool,
) -> None:
    try:
        with QMPClient(socket_path) as qmp:
            qmp.commit(overlay_node, f"sparsefs-commit-{os.getpid()}", timeout=COMMIT_TIMEOUT)
            if window is not None:
                if rotate:
                    qmp.execute(
                        "transaction",
                        actions=[
                            {
                                "type": "block-dirty-bitmap-clear",
                                "data": {"node": node, "name": bitmap},
                            },
                            {
                                "type": "block-dirty-bitmap-merge",
                                "data": {"node": node, "target": bitmap, "bitmaps": [window]},
                            },
                        ],
                    )
                qmp.execute("block-dirty-bitmap-remove", node=node, name=window)
    except QMPError as exc:
        raise QMPError(
            f"{exc}; if the VM still writes to the overlay {overlay}, commit it with "
            f"block-commit (device {overlay_node!r}) or 'virsh blockcommit --active --pivot'"
        ) from None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(overlay)


def dispatch(args: argparse.Namespace, full: Callable[[argparse.Namespace], int]) -> int:
    """Run ``backup`` with ``--qmp`` applied; ``full`` is the backup run (``--since`` too).

    Raises:
        SparsefsError: bad option combination, or what the run raises.
    """
    *images, _dest = args.paths
    if not images:
        raise SparsefsError("backup needs at least one IMAGE and a DEST_DIR")
    if not args.node:
        raise SparsefsError("--qmp needs --node NODE (the block node of the image)")
    if len(images) != 1:
        raise SparsefsError("--qmp backs up exactly one image (the one under --node)")
    if getattr(args, "snapshots", False):
        raise SparsefsError("--qmp cannot be combined with --snapshots")
    with snapshot_for_backup(args.qmp, args.node, images[0], args.since) as live:
        status = full(args)
        live.rotate = bool(args.since) and status == 0
        return status
