"""The libvirt binding behind a small typed face: the only module that imports ``libvirt``.

libvirt-python has no type information; everything sparsefs asks of it goes
through :class:`Connection` and :class:`Domain`, which turn each
``libvirt.libvirtError`` into a one-line :class:`VirtError` naming the
domain and the step.  The binding is imported when a connection is opened,
never at start-up: sparsefs without it works as before, and ``--domain``
then says what to install.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sparsefs.errors import SparsefsError

INSTALL_HINT = (
    "--domain needs the libvirt Python binding: run tools/setup, or install Debian's "
    "libvirt-dev and then: pip install 'libvirt-python==9.0.0'"
)

# libvirt's constants (libvirt-domain.h, libvirt-domain-snapshot.h); stable ABI values.
_SNAPSHOT_DISK_ONLY = 1 << 4
_SNAPSHOT_NO_METADATA = 1 << 2
_SNAPSHOT_ATOMIC = 1 << 7
_COMMIT_SHALLOW = 1 << 0
_COMMIT_ACTIVE = 1 << 2
_JOB_ABORT_PIVOT = 1 << 1
_XML_INACTIVE = 1 << 1
_STATE_PAUSED = 3
_UNDEFINE_CHECKPOINTS_METADATA = 1 << 8

T = TypeVar("T")


class VirtError(SparsefsError):
    """libvirt refused or failed a step (one line: the domain, the step, libvirt's words)."""


def _binding() -> Any:
    try:
        import libvirt
    except ImportError:
        raise VirtError(INSTALL_HINT) from None
    return libvirt


def _quiet_errors(libvirt: Any) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Connection:
    """A connection to libvirtd (``uri``: None for libvirt's default)."""

    def __init__(self, uri: str | None) -> None:
        self._libvirt = _binding()
        _quiet_errors(self._libvirt)
        self.uri = uri
        try:
            self._conn = self._libvirt.open(uri)
        except self._libvirt.libvirtError as exc:
            raise VirtError(f"libvirt {uri or '(default URI)'}: {_words(exc)}") from None

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._conn is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def domain(self, name: str) -> Domain:
        """The domain called ``name``.

        Raises:
            VirtError: there is none.
        """
        try:
            return Domain(self, self._conn.lookupByName(name), name)
        except self._libvirt.libvirtError as exc:
            raise VirtError(f"domain {name}: {_words(exc)}") from None

    def define(self, xml: str, name: str) -> Domain:
        """Define (persistently) a domain from ``xml``."""
        try:
            return Domain(self, self._conn.defineXML(xml), name)
        except self._libvirt.libvirtError as exc:
            raise VirtError(f"domain {name}: cannot define it: {_words(exc)}") from None

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; a libvirt error becomes a VirtError saying ``what`` failed."""
        try:
            return fn()
        except self._libvirt.libvirtError as exc:
            raise VirtError(f"{what}: {_words(exc)}") from None


def _words(exc: Any) -> str:
    text = exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)
    return " ".join(str(text).split())


class Domain:
    """One domain, by the operations a backup needs."""

    def __init__(self, conn: Connection, dom: Any, name: str) -> None:
        self._conn = conn
        self._dom = dom
        self.name = name

    def _call(self, step: str, fn: Callable[[], T]) -> T:
        return self._conn.call(f"domain {self.name}: {step}", fn)

    def xml(self, *, inactive: bool = False) -> str:
        """The domain XML: live, or the persistent definition with ``inactive``."""
        flags = _XML_INACTIVE if inactive else 0
        return str(self._call("cannot read its XML", lambda: self._dom.XMLDesc(flags)))

    def is_active(self) -> bool:
        """Whether the domain runs (or is paused)."""
        return bool(self._call("cannot read its state", self._dom.isActive))

    def is_paused(self) -> bool:
        """Whether the domain is paused."""
        state = self._call("cannot read its state", lambda: self._dom.state(0))
        return int(state[0]) == _STATE_PAUSED

    def suspend(self) -> None:
        """Pause the domain's CPUs."""
        self._call("cannot pause it", self._dom.suspend)

    def resume(self) -> None:
        """Resume the domain's CPUs."""
        self._call("cannot resume it", self._dom.resume)

    def start(self) -> None:
        """Start the (defined, stopped) domain."""
        self._call("cannot start it", self._dom.create)

    def destroy(self) -> None:
        """Stop the domain at once."""
        self._call("cannot stop it", self._dom.destroy)

    def undefine(self) -> None:
        """Remove the domain's definition (its checkpoint metadata too)."""
        self._call(
            "cannot undefine it",
            lambda: self._dom.undefineFlags(_UNDEFINE_CHECKPOINTS_METADATA),
        )

    def fs_freeze(self) -> str | None:
        """Freeze the guest's filesystems through the guest agent; None, or why it could not."""
        try:
            self._dom.fsFreeze(None, 0)
        except self._conn._libvirt.libvirtError as exc:
            return _words(exc)
        return None

    def fs_thaw(self) -> None:
        """Thaw the guest's filesystems."""
        self._call("cannot thaw the guest's filesystems", lambda: self._dom.fsThaw(None, 0))

    def checkpoint_names(self) -> list[str]:
        """The names of the domain's checkpoints."""
        cps = self._call("cannot list its checkpoints", lambda: self._dom.listAllCheckpoints(0))
        return sorted(str(cp.getName()) for cp in cps)

    def checkpoint_create(self, xml: str) -> None:
        """Create a checkpoint from ``xml`` (a ``<domaincheckpoint>``)."""
        self._call("cannot create a checkpoint", lambda: self._dom.checkpointCreateXML(xml, 0))

    def checkpoint_delete(self, name: str) -> None:
        """Delete checkpoint ``name`` (its bitmaps too)."""

        def delete() -> None:
            self._dom.checkpointLookupByName(name, 0).delete(0)

        self._call(f"cannot delete checkpoint {name}", delete)

    def snapshot_disk_only(self, xml: str) -> None:
        """One atomic external disk-only snapshot of the disks ``xml`` names, no metadata."""
        flags = _SNAPSHOT_DISK_ONLY | _SNAPSHOT_ATOMIC | _SNAPSHOT_NO_METADATA
        self._call(
            "cannot take the disk-only snapshot", lambda: self._dom.snapshotCreateXML(xml, flags)
        )

    def block_job(self, target: str) -> tuple[int, int] | None:
        """The (cur, end) of the block job on disk ``target``, or None when there is none."""
        info = self._call(
            f"cannot read the block job of {target}", lambda: self._dom.blockJobInfo(target, 0)
        )
        if not info:
            return None
        return int(info["cur"]), int(info["end"])

    def commit_active(self, target: str) -> None:
        """Start committing the active overlay of ``target`` into the image below it."""
        flags = _COMMIT_ACTIVE | _COMMIT_SHALLOW
        self._call(
            f"cannot start the block commit of {target}",
            lambda: self._dom.blockCommit(target, None, None, 0, flags),
        )

    def pivot(self, target: str, timeout: float) -> None:
        """Wait for the commit of ``target`` to be ready, pivot, wait for the job to end.

        Raises:
            VirtError: the job failed, vanished before the pivot, or took longer than ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.block_job(target)
            if job is None:
                raise VirtError(f"domain {self.name}: the block commit of {target} ended unpivoted")
            cur, end = job
            if cur == end and end >= 0:
                try:
                    self._dom.blockJobAbort(target, _JOB_ABORT_PIVOT)
                    break
                except self._conn._libvirt.libvirtError:
                    pass  # not ready yet after all (qemu says when); poll on
            if time.monotonic() > deadline:
                raise VirtError(f"domain {self.name}: the block commit of {target} timed out")
            time.sleep(0.02)
        while self.block_job(target) is not None:
            if time.monotonic() > deadline:
                raise VirtError(f"domain {self.name}: the pivot of {target} timed out")
            time.sleep(0.02)
