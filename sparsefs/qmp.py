"""A small QMP client: talk to a running QEMU (or qemu-storage-daemon) over its monitor socket.

Standard library only (a UNIX socket and JSON).  It knows nothing of FUSE or
of image formats; the CLI uses it to take an external snapshot of a running
VM's disk, back up the now read-only base, and commit the overlay back.

The protocol (qemu's docs/interop/qmp-spec): the server greets with
``{"QMP": ...}``; the client sends ``{"execute": "qmp_capabilities"}``; then
each command gets one ``{"return": ...}`` or ``{"error": {"class", "desc"}}``
reply, with asynchronous ``{"event": ...}`` messages in between.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from sparsefs.errors import SparsefsError

DEFAULT_TIMEOUT = 30.0


class QMPError(SparsefsError):
    """QEMU refused a command, or the monitor could not be reached or understood."""


class QMPClient:
    """One monitor connection.  Use as a context manager.

    Args:
        path: the monitor's UNIX socket.
        timeout: seconds to wait for any one reply.
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise QMPError(f"{path}: cannot connect to the QMP monitor: {exc.strerror}") from None
        try:
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QMPError(f"{path}: not a QMP monitor (no greeting)")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection; idempotent."""
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QMPError(f"{self.path}: QMP monitor did not answer in time") from None
            except OSError as exc:
                raise QMPError(f"{self.path}: QMP monitor read failed: {exc.strerror}") from None
            if not chunk:
                raise QMPError(f"{self.path}: QMP monitor closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError(f"{self.path}: QMP monitor sent something that is not JSON") from None
        if not isinstance(msg, dict):
            raise QMPError(f"{self.path}: QMP monitor sent an unexpected message")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` with ``arguments`` (``_`` in keywords stays ``_``); return its result.

        Events that arrive meanwhile are kept in :attr:`events`.

        Raises:
            QMPError: QEMU answered with an error (its description is in the
                message), or the connection failed.
        """
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"{self.path}: QMP monitor write failed: {exc.strerror}") from None
        while True:
            reply = self._read_message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                desc = reply["error"].get("desc", "unknown error")
                raise QMPError(f"{self.path}: QEMU refused {command}: {desc}")
            if "return" in reply:
                return reply["return"]

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Poll ``check`` (which may run commands) until true.

        Raises:
            QMPError: ``timeout`` seconds (default: the client's) passed first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not check():
            if time.monotonic() > deadline:
                raise QMPError(f"{self.path}: timed out waiting for {what}")
            time.sleep(0.05)

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The ``query-jobs`` entry of ``job_id``, or None once it is gone."""
        for job in self.execute("query-jobs"):
            if job.get("id") == job_id:
                return job  # type: ignore[no-any-return]  # QMP replies are JSON: a dict here
        return None

    # -- the external snapshot flow ---------------------------------------------------

    def snapshot(self, node: str, overlay: str, overlay_node: str) -> None:
        """Put a new qcow2 overlay file ``overlay`` on top of ``node`` (blockdev-snapshot-sync).

        From then on the VM writes go to the overlay and ``node``'s image is
        read-only, so it can be backed up without --force-share.
        """
        self.execute(
            "blockdev-snapshot-sync",
            **{
                "node-name": node,
                "snapshot-file": overlay,
                "snapshot-node-name": overlay_node,
                "format": "qcow2",
            },
        )

    def commit(self, overlay_node: str, job_id: str, timeout: float | None = None) -> None:
        """Commit the active overlay back into its base and pivot to the base.

        Runs ``block-commit`` on the active layer, waits until the job is
        ready, completes it (``job-complete``: the VM switches back to the
        base) and waits until the job is gone.

        Raises:
            QMPError: QEMU refused the commit (for example, the base is still
                open elsewhere without sharing write), or the job failed.
        """
        self.execute(
            "block-commit", **{"job-id": job_id, "device": overlay_node, "auto-dismiss": False}
        )
        state: dict[str, str] = {}

        def status_is(*wanted: str) -> Callable[[], bool]:
            def check() -> bool:
                job = self.job(job_id)
                state["status"] = job["status"] if job else "gone"
                if job and job.get("error"):
                    state["error"] = str(job["error"])
                return state["status"] in (*wanted, "concluded", "gone")

            return check

        try:
            self.wait_for(status_is("ready"), f"commit job {job_id} to be ready", timeout)
            if state["status"] == "ready":
                self.execute("job-complete", id=job_id)
                self.wait_for(status_is(), f"commit job {job_id} to finish", timeout)
        except QMPError:
            self._abandon(job_id)
            raise
        if self.job(job_id) is not None:
            self.execute("job-dismiss", id=job_id)
        if "error" in state:
            raise QMPError(f"{self.path}: commit job {job_id} failed: {state['error']}")

    def _abandon(self, job_id: str) -> None:
        """Cancel and dismiss ``job_id`` after a failure; errors here are not reported."""
        try:
            if self.job(job_id) is None:
                return
            self.execute("job-cancel", id=job_id)
            self.wait_for(
                lambda: (self.job(job_id) or {}).get("status", "concluded") == "concluded",
                f"job {job_id} to be cancelled",
                10,
            )
            if self.job(job_id) is not None:
                self.execute("job-dismiss", id=job_id)
        except QMPError:
            pass
