"""The prune policy: which points each rule keeps (borg's and PBS's meaning), as a pure function."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefs.points.policy import PolicyError, Rules, decide

HOUR = 3600
DAY = 24 * HOUR


def at(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    return float(calendar.timegm((y, mo, d, h, mi, 0)))


def kept_indexes(times: list[float], rules: Rules) -> list[int]:
    return [i for i, why in enumerate(decide(times, rules)) if why is not None]


def test_rules_that_keep_nothing_are_refused() -> None:
    with pytest.raises(PolicyError, match="keeps something"):
        decide([1.0, 2.0], Rules())
    with pytest.raises(PolicyError, match="--keep-daily must be 0 or more"):
        decide([1.0], Rules(last=1, daily=-1))


def test_keep_last_keeps_the_newest_points() -> None:
    times = [at(2026, 12, 1, h) for h in range(6)]
    assert decide(times, Rules(last=2)) == [None, None, None, None, "last 2", "last 1"]
    assert kept_indexes(times, Rules(last=10)) == list(range(6))


def test_daily_keeps_the_newest_point_of_each_day() -> None:
    times = [at(2026, 12, 1, 1), at(2026, 12, 1, 23), at(2026, 12, 3, 2), at(2026, 12, 3, 5)]
    assert decide(times, Rules(daily=2)) == [None, "daily 2", None, "daily 1"]


def test_a_period_already_kept_does_not_count() -> None:
    # keep-last keeps the newest point, which is also day 3's newest: daily 2 then keeps
    # the newest points of the two days before.
    times = [at(2026, 12, 1, 9), at(2026, 12, 2, 9), at(2026, 12, 2, 10), at(2026, 12, 3, 9)]
    assert decide(times, Rules(last=1, daily=2)) == [
        "daily 2",
        None,
        "daily 1",
        "last 1",
    ]


def test_periods_without_points_do_not_count() -> None:
    # Points on Dec 1, 5 and 20: daily 2 keeps Dec 20 and Dec 5, not empty days.
    times = [at(2026, 12, 1), at(2026, 12, 5), at(2026, 12, 20)]
    assert kept_indexes(times, Rules(daily=2)) == [1, 2]


def test_a_rule_short_of_periods_keeps_the_oldest_point_as_borg_does() -> None:
    times = [at(2026, 12, 1, 1), at(2026, 12, 1, 5), at(2026, 12, 2, 1)]
    assert decide(times, Rules(daily=7)) == ["daily[oldest]", "daily 2", "daily 1"]
    # A rule that reaches its count keeps no oldest point.
    assert decide(times, Rules(daily=2)) == [None, "daily 2", "daily 1"]


def test_weekly_uses_iso_weeks_and_monthly_calendar_months() -> None:
    # 2026-12-27 is a Sunday (ISO week 52), 2026-12-28 a Monday (week 53); 2027-01-01 is in
    # week 53 of 2026 but in another month.
    times = [at(2026, 12, 27), at(2026, 12, 28), at(2027, 1, 1)]
    assert decide(times, Rules(weekly=2)) == ["weekly 2", None, "weekly 1"]
    assert decide(times, Rules(monthly=2)) == [None, "monthly 2", "monthly 1"]


def test_hourly_then_monthly() -> None:
    times = [at(2026, 10, 3), at(2026, 11, 30, 8), at(2026, 11, 30, 9), at(2026, 12, 1, 1)]
    # December's and November's newest points are kept by hourly already, so they do not
    # count for monthly: October's is monthly 1; November 30 08:00 is not a month's newest.
    assert decide(times, Rules(hourly=2, monthly=2)) == [
        "monthly 1",
        None,
        "hourly 2",
        "hourly 1",
    ]


def test_equal_times_are_ordered_by_position() -> None:
    t = at(2026, 12, 1)
    assert decide([t, t, t], Rules(last=1)) == [None, None, "last 1"]
    assert decide([t, t], Rules(daily=1)) == [None, "daily 1"]


# -- properties ----------------------------------------------------------------------

_START = at(2026, 1, 1)
_times = st.lists(
    st.integers(min_value=0, max_value=400 * DAY).map(lambda s: float(_START + s)),
    min_size=1,
    max_size=40,
).map(sorted)
_counts = st.integers(min_value=0, max_value=6)
_rules = st.builds(Rules, _counts, _counts, _counts, _counts, _counts).filter(
    lambda r: any((r.last, r.hourly, r.daily, r.weekly, r.monthly))
)


def _period_key(rule: str, t: float) -> str:
    fmt = {"hourly": "%Y%m%d%H", "daily": "%Y%m%d", "weekly": "%G%V", "monthly": "%Y%m"}[rule]
    return time.strftime(fmt, time.gmtime(t))


@settings(max_examples=300, deadline=None)
@given(_times, _rules)
def test_the_newest_point_is_always_kept(times: list[float], rules: Rules) -> None:
    assert decide(times, rules)[-1] is not None


@settings(max_examples=300, deadline=None)
@given(_times, _rules)
def test_every_kept_point_is_explained_by_its_rule(times: list[float], rules: Rules) -> None:
    decisions = decide(times, rules)
    order = sorted(range(len(times)), key=lambda i: (times[i], i), reverse=True)
    for i, why in enumerate(decisions):
        if why is None:
            continue
        rule, _, rank = why.partition(" ")
        if rule == "last":
            assert order.index(i) < rules.last
            continue
        if rule.endswith("[oldest]"):
            assert i == order[-1]
            continue
        assert 1 <= int(rank) <= getattr(rules, rule)
        # The newest point of its period.
        newer_same = [
            j
            for j in order[: order.index(i)]
            if _period_key(rule, times[j]) == _period_key(rule, times[i])
        ]
        assert not newer_same


@settings(max_examples=300, deadline=None)
@given(_times, st.integers(min_value=1, max_value=8))
def test_a_single_period_rule_keeps_the_newest_of_the_newest_periods(
    times: list[float], n: int
) -> None:
    for rule in ("hourly", "daily", "weekly", "monthly"):
        newest_of: dict[str, int] = {}
        for i, t in enumerate(times):  # oldest first: the last seen is the newest
            newest_of[_period_key(rule, t)] = i
        periods = sorted(newest_of, key=lambda p: newest_of[p], reverse=True)
        expected = {newest_of[p] for p in periods[:n]}
        if len(periods) < n:
            expected.add(0)  # borg's oldest point
        assert set(kept_indexes(times, Rules(**{rule: n}))) == expected, rule


@settings(max_examples=300, deadline=None)
@given(_times, _rules, st.sampled_from(["last", "hourly", "daily", "weekly", "monthly"]))
def test_a_larger_count_never_drops_a_kept_point(
    times: list[float], rules: Rules, rule: str
) -> None:
    more = Rules(**{**rules.__dict__, rule: getattr(rules, rule) + 1})
    assert set(kept_indexes(times, rules)) <= set(kept_indexes(times, more))


@settings(max_examples=200, deadline=None)
@given(_times, st.integers(min_value=1, max_value=50))
def test_keep_last_alone_keeps_exactly_the_newest_n(times: list[float], n: int) -> None:
    assert kept_indexes(times, Rules(last=n)) == list(range(max(0, len(times) - n), len(times)))
