"""The bench's report: medians, ratios, the targets of issues 7, 10, 11 and 12, the table, JSON.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from common import MiB, human
from contenders import Bench, Samples

Results = dict[str, dict[str, Samples]]


@dataclass
class Row:
    """One line of the table."""

    workload: str
    metric: str
    values: dict[str, float | None]
    ratios: dict[str, float | None]
    target: str
    ok: bool | None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def med(res: Results, wl: str, who: str, metric: str) -> float | None:
    """The median of one contender's metric on one workload, None when not measured."""
    s = res.get(wl, {}).get(who)
    return s.median(metric) if s else None


def _cp3(res: Results, wl: str) -> tuple[float | None, float | None, float | None]:
    """Median cp wall seconds of sparsefs+cp, qsd+cp and convert on ``wl``."""
    s, q, c = (med(res, wl, w, "copy_s") for w in ("sparsefs+cp", "qsd+cp", "convert"))
    return s, q, c


def _cp_row(res: Results, wl: str) -> Row:
    """W1, W2, W7: cp through the mount against qsd and convert."""
    s, q, c = _cp3(res, wl)
    rq, rc = ratio(s, q), ratio(s, c)
    if wl == "W7":  # issue 12: report it
        ok, target = None, "(info)"
    else:
        ok = None if rq is None or rc is None else rq <= 1.0 and rc <= 2.5
        target = "<=1.0x qsd, <=2.5x convert"
    values = {"sparsefs": s, "qsd": q, "convert": c}
    return Row(wl, "cp wall s", values, {"/qsd": rq, "/convert": rc}, target, ok)


def _vs_qsd(res: Results, wl: str, metric: str, tool: str = "cp") -> tuple[float | None, ...]:
    """(sparsefs, qsd, sparsefs/qsd) medians of ``metric`` through the two mounts."""
    s, q = med(res, wl, f"sparsefs+{tool}", metric), med(res, wl, f"qsd+{tool}", metric)
    return s, q, ratio(s, q)


def _w3_rows(res: Results) -> list[Row]:
    """W3: mount ready time, seek walk, cp, peak RSS."""
    out = []
    for metric, label, target, limit in (
        ("mount_s", "mount ready s", "< 1 s", 1.0),
        ("walk_s", "seek walk s", "< 1 s", 1.0),
        ("copy_s", "cp wall s", "(info)", None),
        ("rss_mib", "peak RSS MiB", "< 150 MiB", 150.0),
    ):
        s, q, rq = _vs_qsd(res, "W3", metric)
        ok = None if s is None or limit is None else s < limit
        out.append(Row("W3", label, {"sparsefs": s, "qsd": q}, {"/qsd": rq}, target, ok))
    return out


def _w4_row(res: Results, data: int) -> Row:
    """W4: read throughput of the fully allocated image."""
    s, q, c = _cp3(res, "W4")
    tput = {
        k: (data / MiB / v if v else None) for k, v in (("sparsefs", s), ("qsd", q), ("convert", c))
    }
    rq = ratio(tput["sparsefs"], tput["qsd"])
    ratios = {"/qsd": rq, "/convert": ratio(tput["sparsefs"], tput["convert"])}
    return Row("W4", "cp MiB/s", tput, ratios, ">=0.8x qsd", None if rq is None else rq >= 0.8)


def _holes_row(res: Results, wl: str, tool: str, limit: float) -> Row:
    """W5 (rsync) and W6 (cat): copiers that read the holes, against qsd."""
    s, q, rq = _vs_qsd(res, wl, "copy_s", tool)
    ok = None if rq is None else rq <= limit
    return Row(wl, f"{tool} wall s", {"sparsefs": s, "qsd": q}, {"/qsd": rq}, f"<={limit}x qsd", ok)


def _format_row(res: Results, wl: str) -> Row:
    """V1, X1: W1's data in another format, against W1 through sparsefs."""
    s, q, c = _cp3(res, wl)
    rp = ratio(s, med(res, "W1", "sparsefs+cp", "copy_s"))
    return Row(
        wl,
        "cp wall s",
        {"sparsefs": s, "qsd": q, "convert": c},
        {"/qsd": ratio(s, q), "/convert": ratio(s, c)},
        f"<=1.2x W1 sparsefs ({fmt(rp, 2)}x)",
        None if rp is None else rp <= 1.2,
    )


def _prealloc_row(res: Results, wl: str) -> Row:
    """P1, P2: W1's data preallocated, against qsd and W1 through sparsefs."""
    s, q, c = _cp3(res, wl)
    plain = med(res, "W1", "sparsefs+cp", "copy_s")
    rq, rp = ratio(s, q), ratio(s, plain)
    return Row(
        wl,
        "cp wall s",
        {"sparsefs": s, "qsd": q, "convert": c},
        {"/qsd": rq, "/convert": ratio(s, c)},
        "<=0.1x qsd, <=1.5x W1 sparsefs",
        None if rq is None or rp is None else rq <= 0.1 and rp <= 1.5,
    )


def rows(bench: Bench) -> list[Row]:
    """Medians, ratios and targets (issue 7) for every measured workload."""
    res = bench.results
    out = [_cp_row(res, wl) for wl in ("W1", "W2") if wl in res]
    if "W3" in res:
        out += _w3_rows(res)
    if "W4" in res:
        out.append(_w4_row(res, bench.info["W4"]["data_bytes"]))
    if "W5" in res:
        out.append(_holes_row(res, "W5", "rsync", 0.7))
    if "W6" in res:
        out.append(_holes_row(res, "W6", "cat", 0.5))
    if "W7" in res:
        out.append(_cp_row(res, "W7"))
    out += [_format_row(res, wl) for wl in ("V1", "X1") if wl in res]
    out += [_prealloc_row(res, wl) for wl in ("P1", "P2") if wl in res]
    return out


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def print_table(bench: Bench, table: list[Row]) -> None:
    a = bench.args
    print(
        f"sparsefs benchmark: {a.rounds} rounds, medians"
        f"{' (quick)' if a.quick else ''}; {os.cpu_count()} CPUs; "
        f"sparsefs options: {' '.join(a.sparsefs_opt) or '(none)'}"
    )
    for name, info in bench.info.items():
        print(
            f"  {name}: {human(info['virtual_size'])} virtual, {human(info['data_bytes'])} "
            f"data in {info['extents']} {info.get('extents_are', 'writes')}"
            + (f", {info['lseek_calls']} lseek calls per walk" if "lseek_calls" in info else "")
        )
    head = ["wl", "metric", "sparsefs", "qsd", "convert", "s/qsd", "s/convert", "target", "result"]
    lines = [head]
    for r in table:
        lines.append(
            [
                r.workload,
                r.metric,
                fmt(r.values.get("sparsefs")),
                fmt(r.values.get("qsd")),
                fmt(r.values.get("convert")),
                fmt(r.ratios.get("/qsd")),
                fmt(r.ratios.get("/convert")),
                r.target,
                "-" if r.ok is None else ("pass" if r.ok else "MISS"),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    # Daemon CPU (user + system, whole life of the mount): less noisy than wall time
    # on a busy machine, and what the FUSE layer costs.
    cpu = []
    for wl, by in bench.results.items():
        for who, samples in by.items():
            med = samples.median("cpu_s")
            if med is not None:
                cpu.append(f"{wl} {who} {med:.2f}")
    if cpu:
        print("daemon CPU s (median): " + "; ".join(cpu))


def to_json(bench: Bench, table: list[Row]) -> dict[str, Any]:
    return {
        "rounds": bench.args.rounds,
        "quick": bench.args.quick,
        "sparsefs_options": bench.args.sparsefs_opt,
        "workloads": bench.info,
        "samples": {
            wl: {who: s.values for who, s in by.items()} for wl, by in bench.results.items()
        },
        "table": [dataclasses.asdict(r) for r in table],
    }
