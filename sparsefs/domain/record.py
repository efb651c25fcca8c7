"""The runs of a libvirt domain in a backup set: which point each disk got, the XML, the checkpoint.

Beside the points, in DEST_DIR (names relative to it)::

    DOMAIN.libvirt.json            the domain's runs (below), replaced atomically
    DOMAIN.libvirt/RUN.xml         the domain XML (its persistent definition) at run RUN
    .DOMAIN.libvirt-run.json       only while a run of a running domain is under way
                                   (:mod:`sparsefs.domain.repair` reads it after a kill)

The runs file::

    {"format": "sparsefs-domain", "version": 1, "domain": NAME,
     "runs": [RUN, ...]}                                        # oldest first
    RUN = {"id": "20261203T190500Z", "time": ISO-8601, "state": "running" | "stopped",
           "frozen": "guest-agent" | "paused" | "stopped", "xml": "DOMAIN.libvirt/ID.xml",
           "checkpoint": NAME or null,
           "disks": {TARGET: {"disk": "DOMAIN-TARGET", "point": ID, "format": "qcow2"|"raw",
                              "source": the image's path}}}

``checkpoint`` names the libvirt checkpoint whose bitmaps hold every write
made since the run's points (or more): only the newest run keeps one; older
runs lose theirs (``null``) as the checkpoint is deleted.  A run is recorded
only after every disk's point is recorded in the set's manifest; a run
whose points were all pruned is forgotten by the next run (``forget_pruned``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sparsefs.points.set import LATEST, BackupSet, SetError, fsync_dir, id_time, write_atomic

FORMAT = "sparsefs-domain"
VERSION = 1
CHECKPOINT_PREFIX = "sparsefs-"


def runs_file(domain: str) -> str:
    """The domain's runs file, relative to the set."""
    return f"{domain}.libvirt.json"


def state_file(domain: str) -> str:
    """The file a run under way keeps (relative to the set)."""
    return f".{domain}.libvirt-run.json"


def disk_name(domain: str, target: str) -> str:
    """The set's disk name of a domain's disk: ``DOMAIN-TARGET``."""
    return f"{domain}-{target}"


@dataclass
class DiskRun:
    """One disk of a run."""

    disk: str
    point: str
    format: str
    source: str


@dataclass
class Run:
    """One run of a domain (see the module docstring)."""

    id: str
    state: str
    frozen: str
    xml: str
    checkpoint: str | None
    disks: dict[str, DiskRun] = field(default_factory=dict)
    time: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The runs file's form."""
        return asdict(self)


@dataclass
class DomainRuns:
    """The runs of domain ``domain`` in the set at ``root``."""

    root: str
    domain: str
    runs: list[Run] = field(default_factory=list)

    @classmethod
    def load(cls, root: str, domain: str) -> DomainRuns:
        """Read the runs file (none yet: no runs).

        Raises:
            SetError: the file is damaged.
        """
        path = os.path.join(root, runs_file(domain))
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return cls(root, domain)
        except (OSError, ValueError):
            raise SetError(f"{path}: the domain's runs file is damaged") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SetError(f"{path}: not a sparsefs domain runs file")
        try:
            runs = [
                Run(
                    **{k: v for k, v in r.items() if k != "disks"},
                    disks={t: DiskRun(**d) for t, d in r["disks"].items()},
                )
                for r in doc["runs"]
            ]
        except (KeyError, TypeError, AttributeError):
            raise SetError(f"{path}: the domain's runs file is damaged") from None
        return cls(root, domain, runs)

    def path(self, rel: str) -> str:
        """A path relative to the set."""
        return os.path.join(self.root, rel)

    def latest(self) -> Run | None:
        """The newest run, or None."""
        return self.runs[-1] if self.runs else None

    def resolve(self, name: str = LATEST) -> Run:
        """The run ``name`` names: an id, a unique prefix, or ``latest``.

        Raises:
            SetError: no runs, none or several match.
        """
        where = self.path(runs_file(self.domain))
        if not self.runs:
            raise SetError(f"{where}: domain {self.domain} has no backup in this set")
        if name == LATEST:
            return self.runs[-1]
        exact = [r for r in self.runs if r.id == name]
        found = exact or [r for r in self.runs if r.id.startswith(name)]
        if len(found) == 1 and name:
            return found[0]
        what = "matches several runs" if found else "names no run"
        raise SetError(f"{where}: {name!r} {what} of domain {self.domain}")

    def save_xml(self, run_id: str, xml: str) -> str:
        """Store the domain XML of run ``run_id``; return its name relative to the set."""
        rel = f"{self.domain}.libvirt/{run_id}.xml"
        directory = self.path(f"{self.domain}.libvirt")
        made = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        write_atomic(self.path(rel), xml)
        if made:
            fsync_dir(self.root)
        return rel

    def add(self, run: Run) -> None:
        """Record a run (after all its points are recorded), atomically."""
        run.time = id_time(run.id)
        self.runs.append(run)
        self.save()

    def save(self) -> None:
        """Write the runs file atomically."""
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "domain": self.domain,
            "runs": [r.as_dict() for r in self.runs],
        }
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        write_atomic(self.path(runs_file(self.domain)), text)

    def forget_pruned(self, bset: BackupSet) -> list[str]:
        """Drop the runs none of whose points the set still has (pruned), and their XML.

        Returns the ids of the runs dropped.  Call with the set's lock held.
        """
        keep: list[Run] = []
        gone: list[Run] = []
        for r in self.runs:
            alive = any(
                any(p.id == d.point for p in bset.disks.get(d.disk, [])) for d in r.disks.values()
            )
            (keep if alive else gone).append(r)
        if gone:
            self.runs = keep
            self.save()
            for r in gone:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(r.xml))
        return [r.id for r in gone]

    def kept_checkpoints(self) -> set[str]:
        """The checkpoints the runs say libvirt keeps."""
        return {r.checkpoint for r in self.runs if r.checkpoint}
