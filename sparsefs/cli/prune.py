"""``sparsefs prune``: drop the points a retention policy does not keep (borg's and PBS's rules).

``prune DEST_DIR --keep-last N [--keep-hourly N --keep-daily N --keep-weekly N
--keep-monthly N] [--dry-run] [--json]`` decides per disk which points stay
(:mod:`sparsefs.points.policy`) and merges each dropped point's blocks into
the kept point that reads it (:mod:`sparsefs.points.prune`).  It prints one
line per point, ``keep`` with the rule that keeps it or ``prune``, as borg's
``prune --list`` does.
"""

from __future__ import annotations

import argparse
import json
import time

from sparsefs.cli.common import EXIT_OK
from sparsefs.points.policy import RULES, Rules
from sparsefs.points.prune import prune, result_dict
from sparsefs.points.set import BackupSet
from sparsefs.progress import human_bytes, human_duration


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune the set; see the subcommand help."""
    rules = Rules(**{rule: getattr(args, f"keep_{rule}") for rule in RULES})
    rules.check()
    t0 = time.monotonic()
    with BackupSet.open(args.dest, lock=not args.dry_run) as bset:
        results = prune(bset, rules, dry_run=args.dry_run)
    seconds = time.monotonic() - t0
    if args.json:
        doc = {
            "dry_run": args.dry_run,
            "seconds": round(seconds, 3),
            "disks": [result_dict(r) for r in results],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    dropped = 0
    for r in results:
        for m in r.finished:
            dropped_ids = ", ".join(m.dropped)
            print(f"{r.disk}: finished an interrupted merge of {dropped_ids} into {m.into}")
        for d in r.decisions:
            what = f"keep   ({d.rule})" if d.keep else "prune"
            print(f"{what:<22} {r.disk}@{d.point.id:<20} {d.point.time}  {d.point.kind}")
            dropped += not d.keep
        for m in r.merges:
            print(
                f"{r.disk}: merged {', '.join(m.dropped)} into {m.into} "
                f"({human_bytes(m.merged_bytes)} written and verified)"
            )
    verb = "would prune" if args.dry_run else "pruned"
    print(f"{verb} {dropped} point(s) in {human_duration(seconds)}")
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``prune``."""
    p = sub.add_parser(
        "prune",
        help="drop the points of a backup set that a retention policy does not keep",
        description="Keep, for every disk of the backup set in DEST_DIR, the points the rules "
        "select and drop the others (borg's and Proxmox Backup Server's rules): --keep-last "
        "keeps the N newest points; --keep-hourly/daily/weekly/monthly keep the newest point "
        "of each of the N newest hours/days/ISO weeks/months (UTC) that hold a point and whose "
        "newest point no earlier rule kept; a rule short of periods also keeps the oldest "
        "point (as borg). The newest point is always kept. A dropped point's blocks are "
        "merged into the kept point that reads it (a new file, verified against that point's "
        "digest, then renamed over it): every kept point reads exactly as before, at every "
        "instant. A prune killed at any moment leaves every kept point intact; run it again "
        "to finish.",
    )
    p.add_argument("dest", metavar="DEST_DIR", help="the backup set")
    for rule, what in (
        ("last", "the N newest points"),
        ("hourly", "the newest point of each of the N newest hours with a point"),
        ("daily", "the newest point of each of the N newest days with a point"),
        ("weekly", "the newest point of each of the N newest ISO weeks with a point"),
        ("monthly", "the newest point of each of the N newest months with a point"),
    ):
        p.add_argument(
            f"--keep-{rule}", type=int, default=0, metavar="N", help=f"keep {what} (default 0)"
        )
    p.add_argument(
        "-n", "--dry-run", action="store_true", help="show what would go; change nothing"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the decisions and merges as JSON")
    p.set_defaults(func=cmd_prune)
