"""Undo what a killed run left on a domain, and the guardian that does it the moment a run dies.

A run of a running domain moves every disk onto an overlay
(``.IMAGE.sparsefs-RUN.qcow2`` beside the image) and creates a checkpoint
``sparsefs-RUN``.  Its own ``finally`` commits and pivots back; when the
process is killed outright (SIGKILL, OOM), :func:`repair` does it instead:

1. a domain the killed run paused is resumed (one its owner paused stays paused);
2. a disk still on a sparsefs overlay is committed back (the running commit
   job is waited for, or one is started) and pivoted;
3. overlay files of that pattern beside the domain's images are removed;
4. ``sparsefs-*`` checkpoints that no recorded run keeps are deleted.

It runs at the start of every run (under the set's lock), and in the
guardian: a process each live run starts, which holds the set's lock with
it and waits on a pipe; when the run exits without saying ``done`` on the
pipe, the guardian repairs at once and then lets the lock go.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

from sparsefs.domain import domxml
from sparsefs.domain.record import CHECKPOINT_PREFIX, DomainRuns, state_file
from sparsefs.domain.virt import Connection, Domain, VirtError

COMMIT_TIMEOUT = 3600.0
OVERLAY = re.compile(r"^\..+\.sparsefs-\d{8}T\d{6}Z(-\d+)?\.qcow2$")

Say = Callable[[str], None]


def overlay_path(image: str, run_id: str) -> str:
    """The overlay file of ``image`` for run ``run_id``: beside it, hidden."""
    directory, base = os.path.split(os.path.abspath(image))
    return os.path.join(directory, f".{base}.sparsefs-{run_id}.qcow2")


def write_state(runs: DomainRuns, state: dict[str, object]) -> None:
    """Record the run under way (before the domain is touched)."""
    from sparsefs.points.set import write_atomic

    write_atomic(runs.path(state_file(runs.domain)), json.dumps(state, indent=2) + "\n")


def read_state(runs: DomainRuns) -> dict[str, object] | None:
    """The record of a run under way (or killed), or None."""
    try:
        with open(runs.path(state_file(runs.domain)), encoding="utf-8") as f:
            doc = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def clear_state(runs: DomainRuns) -> None:
    """Forget the run under way (it ended, its domain is back on its images)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(runs.path(state_file(runs.domain)))


def commit_back(dom: Domain, say: Say | None = None) -> None:
    """Commit and pivot every disk of ``dom`` that runs on a sparsefs overlay."""
    for disk in domxml.disks(dom.xml()):
        if disk.path is None or not OVERLAY.match(os.path.basename(disk.path)):
            continue
        if say is not None:
            say(
                f"domain {dom.name}: disk {disk.target} still runs on the overlay {disk.path} "
                "of a killed run: committing it back"
            )
        if dom.block_job(disk.target) is None:
            dom.commit_active(disk.target)
        dom.pivot(disk.target, COMMIT_TIMEOUT)


def remove_overlays(dom: Domain, state: dict[str, object] | None) -> list[str]:
    """Remove sparsefs overlay files beside the domain's images that it does not use."""
    in_use = {d.path for d in domxml.disks(dom.xml()) if d.path}
    directories = {os.path.dirname(p) for p in in_use if p}
    overlays = state.get("overlays") if state else None
    if isinstance(overlays, dict):
        directories |= {os.path.dirname(str(pair[1])) for pair in overlays.values()}
    removed = []
    for directory in sorted(directories):
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if OVERLAY.match(name) and path not in in_use:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        removed.append(path)
    return removed


def drop_checkpoints(dom: Domain, keep: set[str], say: Say | None = None) -> None:
    """Delete the ``sparsefs-*`` checkpoints of ``dom`` not in ``keep``."""
    for name in dom.checkpoint_names():
        if name.startswith(CHECKPOINT_PREFIX) and name not in keep:
            if say is not None:
                say(f"domain {dom.name}: checkpoint {name} belongs to no point: deleted")
            dom.checkpoint_delete(name)


def repair(dom: Domain, runs: DomainRuns, say: Say) -> None:
    """Bring ``dom`` back from a killed run (see the module docstring); idempotent.

    Raises:
        VirtError: libvirt refused a step (the message names it).
    """
    state = read_state(runs)
    if dom.is_active():
        if state is not None and state.get("owner_paused") is False and dom.is_paused():
            say(f"domain {dom.name}: was left paused by a killed run: resumed")
            dom.resume()
        commit_back(dom, say)
    for path in remove_overlays(dom, state):
        say(f"{path}: overlay of a killed run removed")
    if dom.is_active():
        drop_checkpoints(dom, runs.kept_checkpoints(), say)
    clear_state(runs)


class Guardian:
    """The process that repairs the domain if this run dies (see the module docstring)."""

    def __init__(self, root: str, domain: str, uri: str | None, lock_fd: int) -> None:
        read_fd, self._write_fd = os.pipe()
        argv = [sys.executable, "-m", "sparsefs.domain.repair", root, domain, str(read_fd)]
        argv += [uri] if uri else []
        try:
            self._proc = subprocess.Popen(
                argv, pass_fds=(read_fd, lock_fd), start_new_session=True, stdin=subprocess.DEVNULL
            )
        finally:
            os.close(read_fd)

    def release(self) -> None:
        """The run ended cleanly: the guardian exits without touching anything."""
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"done")
        os.close(self._write_fd)
        self._proc.wait()


def _guard(argv: list[str]) -> int:
    root, domain, fd = argv[0], argv[1], int(argv[2])
    uri = argv[3] if len(argv) > 3 else None
    said = b""
    while chunk := os.read(fd, 64):
        said += chunk
    if said == b"done":
        return 0

    def say(line: str) -> None:
        print(f"sparsefs: guardian: {line}", file=sys.stderr)

    try:
        with Connection(uri) as conn:
            repair(conn.domain(domain), DomainRuns.load(root, domain), say)
    except (VirtError, OSError) as exc:
        say(f"cannot repair domain {domain}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_guard(sys.argv[1:]))
