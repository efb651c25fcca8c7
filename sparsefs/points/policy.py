"""Which points a prune keeps: a pure function of the points' times (borg's and PBS's rules).

The rules, applied in this order, each to the points not kept by an earlier one:

- ``last N``: the N newest points.
- ``hourly N``, ``daily N``, ``weekly N``, ``monthly N``: walking the points
  newest first, the newest point of each period (an hour, a day, an ISO week,
  a calendar month, in UTC) is kept, for the N newest periods that hold a
  point; a period whose newest point an earlier rule already kept is passed
  over and does not count.  Periods without a point do not count either: a
  disk backed up on 3 days out of 7 keeps those 3 with ``daily 7``.
- As borg (since 1.2) does: when a period rule finds fewer than N periods, it
  also keeps the oldest point (reported as ``daily[oldest]``, say), so the
  first point keeps ageing until newer points fill the rule.

``keep-last`` counts points, as Proxmox Backup Server does (borg's
``--keep-last`` is ``--keep-secondly``: the same while no two points share a
second; ours never do, see point ids).  Any rule with N >= 1 keeps the newest
point; rules that keep nothing (all zero) are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sparsefs.errors import SparsefsError

RULES = ("last", "hourly", "daily", "weekly", "monthly")


class PolicyError(SparsefsError):
    """The rules cannot be applied (they keep nothing, or a count is negative)."""


@dataclass(frozen=True)
class Rules:
    """How many points, or periods, each rule keeps (0: the rule is off)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def check(self) -> None:
        """Refuse negative counts and rules that would keep nothing.

        Raises:
            PolicyError: names the problem.
        """
        for rule in RULES:
            if getattr(self, rule) < 0:
                raise PolicyError(f"--keep-{rule} must be 0 or more")
        if not any(getattr(self, rule) for rule in RULES):
            raise PolicyError(
                "prune needs a rule that keeps something: --keep-last, --keep-hourly, "
                "--keep-daily, --keep-weekly or --keep-monthly of 1 or more"
            )


def _period(fmt: str) -> Callable[[float], str]:
    return lambda t: time.strftime(fmt, time.gmtime(t))


_PERIODS: dict[str, Callable[[float], str]] = {
    "hourly": _period("%Y-%m-%dT%H"),
    "daily": _period("%Y-%m-%d"),
    "weekly": _period("%G-W%V"),
    "monthly": _period("%Y-%m"),
}


def decide(times: Sequence[float], rules: Rules) -> list[str | None]:
    """For each point (its time in seconds since the epoch), the rule that keeps it, or None.

    ``times`` are in the manifest's order, oldest first; equal times are
    ordered by position (the later entry is the newer point).  The answer for
    a kept point is the rule's name with the point's rank in that rule
    (``"daily 2"``: the second day kept), or ``"daily[oldest]"``.

    Raises:
        PolicyError: the rules keep nothing, or a count is negative.
    """
    rules.check()
    newest_first = sorted(range(len(times)), key=lambda i: (times[i], i), reverse=True)
    kept: list[str | None] = [None] * len(times)
    for rank, i in enumerate(newest_first[: rules.last]):
        kept[i] = f"last {rank + 1}"
    for rule, period_of in _PERIODS.items():
        wanted = getattr(rules, rule)
        if not wanted:
            continue
        count = 0
        last_period: str | None = None
        for i in newest_first:
            period = period_of(times[i])
            if period == last_period:
                continue
            last_period = period
            if kept[i] is None:
                count += 1
                kept[i] = f"{rule} {count}"
                if count == wanted:
                    break
        if count < wanted and newest_first and kept[newest_first[-1]] is None:
            kept[newest_first[-1]] = f"{rule}[oldest]"
    return kept
