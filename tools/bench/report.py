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


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("pass" if ok else "MISS")


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def print_header(bench: Bench) -> None:
    """The run's options and the workloads' images."""
    a = bench.args
    print(
        f"sparsefs benchmark: {a.rounds} rounds, medians"
        f"{' (quick)' if a.quick else ''}; {os.cpu_count()} CPUs; "
        f"sparsefs options: {' '.join(a.sparsefs_opt) or '(none)'}"
    )
    if a.taskset:
        print(f"  {pinning(bench)}")
    for name, info in bench.info.items():
        print(
            f"  {name}: {human(info['virtual_size'])} virtual, {human(info['data_bytes'])} "
            f"data in {info['extents']} {info.get('extents_are', 'writes')}"
            + (f", {info['lseek_calls']} lseek calls per walk" if "lseek_calls" in info else "")
        )


def print_table(bench: Bench, table: list[Row]) -> None:
    print_header(bench)
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
                verdict(r.ok),
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


# -- the per-contender table (cold mode, the backup/checksum group) --------------------

Target = tuple[str, float, str]  # (anchor contender, at most this ratio, label)
_BACKUP: tuple[Target, ...] = (("convert+compare", 1.0, ""), ("convert", 1.3, ""))
# Issue 22's "Done when", by (workload, contender).
COLD_TARGETS: dict[tuple[str, str], tuple[Target, ...]] = {
    ("W1", "sparsefs+cp"): (("qsd+cp", 0.8, ""),),
    ("W7", "sparsefs+cp"): (("qsd+cp", 1.0, ""), ("convert", 1.3, "moonshot ")),
    ("W1", "backup"): _BACKUP,
    ("W7", "backup"): _BACKUP,
    ("W1", "checksum"): (("convert", 1.0, ""),),
    ("W1", "verify"): (("compare", 1.5, ""),),
    ("W7", "verify"): (("compare", 1.5, ""),),
}
WARM_TARGETS: dict[tuple[str, str], tuple[Target, ...]] = {
    ("W1", "sparsefs+cp"): (("qsd+cp", 1.0, ""),),
    ("W7", "sparsefs+cp"): (("qsd+cp", 1.2, ""),),
    ("W1", "checksum"): (("xxh128sum", 0.2, ""),),
    ("W1", "backup"): (("convert", 1.5, ""),),
}
# (metric, column head, digits) after the wall time; "-" where not measured.
COLUMNS = (
    ("aqu", "aqu-sz", 3),
    ("read_mib", "rd MiB", 4),
    ("read_reqs", "rd reqs", 5),
    ("req_kib", "KiB/rq", 3),
    ("mount_s", "mount s", 3),
    ("cpu_s", "dmn CPU s", 3),
    ("dreads", "dmn reads", 5),
    ("us_per_dread", "us/dmn read", 3),
)


@dataclass
class ContenderRow:
    """One contender on one workload: its medians and its targets, met or not."""

    workload: str
    contender: str
    medians: dict[str, float | None]
    targets: list[dict[str, Any]]


def _targets(res: Results, wl: str, who: str, cold: bool) -> list[dict[str, Any]]:
    out = []
    for anchor, limit, label in (COLD_TARGETS if cold else WARM_TARGETS).get((wl, who), ()):
        r = ratio(med(res, wl, who, "copy_s"), med(res, wl, anchor, "copy_s"))
        ok = None if r is None else r <= limit
        out.append({"target": f"{label}<={limit}x {anchor}", "ratio": r, "ok": ok})
    return out


def contender_rows(bench: Bench) -> list[ContenderRow]:
    """Every contender of every workload, in run order, with issue 22's targets."""
    out = []
    for wl, by in bench.results.items():
        for who, samples in by.items():
            metrics = ["copy_s", *(m for m, _, _ in COLUMNS)]
            medians = {m: samples.median(m) for m in metrics}
            out.append(
                ContenderRow(wl, who, medians, _targets(bench.results, wl, who, bench.args.cold))
            )
    return out


def _target_cell(targets: list[dict[str, Any]]) -> str:
    return "; ".join(f"{t['target']}: {fmt(t['ratio'])}x {verdict(t['ok'])}" for t in targets)


def print_contender_table(bench: Bench, table: list[ContenderRow]) -> None:
    """The per-contender table, with the disk's queue depth when cold."""
    a = bench.args
    mode = (
        f"cold (page cache dropped before every contender; images on {bench.disk})"
        if a.cold
        else "warm"
    )
    print(f"per contender, {mode}: {a.rounds} rounds, medians; {pinning(bench)}")
    # Only the columns measured (warm: no disk figures).
    columns = [c for c in COLUMNS if any(r.medians.get(c[0]) is not None for r in table)]
    head = ["wl", "contender", "wall s", *(h for _, h, _ in columns), "targets (issue 22)"]
    lines = [head]
    for r in table:
        cells = [fmt(r.medians.get(m), d) for m, _, d in columns]
        lines.append(
            [r.workload, r.contender, fmt(r.medians["copy_s"]), *cells, _target_cell(r.targets)]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    print(
        "  aqu-sz: the disk's average queue depth while the command ran (/proc/diskstats "
        "time_in_queue / wall, iostat -x aqu-sz); rd MiB, rd reqs, KiB/rq: what it read "
        "(other work on the disk counts too)"
    )
    print(
        "  dmn CPU s: the daemon's user+sys CPU over its life; dmn reads: its read-type "
        "syscalls during the copy (/proc/PID/io syscr: a read of /dev/fuse per FUSE "
        "request, plus its reads of the image); us/dmn read: its CPU during the copy per read"
    )


def pinning(bench: Bench) -> str:
    """Which CPUs the contenders ran on, as the report says it."""
    if not bench.args.taskset:
        return f"{os.cpu_count()} CPUs, not pinned"
    seen = ", ".join(f"{system} daemon on {cpus}" for system, cpus in bench.pins.items())
    return f"pinned: taskset -c {bench.args.taskset} for every contender ({seen or 'no daemon'})"
