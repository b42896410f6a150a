"""Results of one invocation: per-run JSON lines, and the summary table against the targets.

Why a ratio per repetition as well as a ratio of medians: the systems run alternately within
a repetition, so pairing mailhaven's run with the peer's run of the same repetition cancels
much of the machine's drift (perf-baseline.md measured 6-20 % spread between runs; Postfix
up to 93 %). The table shows the ratio of the medians and the range of the paired ratios.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common


@dataclass
class Goal:
    """`kind`: "ratio>=" / "ratio<=" (ours/peer) or "<=" (ours, absolute, in `unit`)."""

    kind: str
    value: float
    peer: str | None = None

    def text(self, unit: str) -> str:
        if self.kind.startswith("ratio"):
            return f"{self.kind[5:]} {self.value:g}x {self.peer}"
        return f"{self.kind} {self.value:g} {unit}"


@dataclass
class Metric:
    target: str
    name: str
    unit: str
    ours: str
    goals: list[Goal] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, system: str, value: float) -> None:
        self.values.setdefault(system, []).append(value)

    def med(self, system: str) -> float | None:
        v = self.values.get(system)
        return statistics.median(v) if v else None

    def paired(self, peer: str) -> list[float]:
        a, b = self.values.get(self.ours, []), self.values.get(peer, [])
        return [x / y for x, y in zip(a, b, strict=False) if y]

    def ratio(self, peer: str) -> float | None:
        a, b = self.med(self.ours), self.med(peer)
        return a / b if a is not None and b else None

    def verdict(self, goal: Goal) -> bool | None:
        ours = self.med(self.ours)
        if ours is None:
            return None
        if goal.kind == "<=":
            return ours <= goal.value
        r = self.ratio(goal.peer or "")
        if r is None:
            return None
        return r >= goal.value if goal.kind == "ratio>=" else r <= goal.value

    def peers(self) -> list[str]:
        return [s for s in self.values if s != self.ours]


def cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    return f"{common.fmt(statistics.median(values))} ({common.fmt(min(values))}-{common.fmt(max(values))})"


def table(metrics: list[Metric]) -> list[str]:
    """Markdown: one row per metric and peer (a metric without peers gets one row)."""
    out = ["| target | metric | mailhaven, median (min-max) | peer | peer, median (min-max) "
           "| ratio mailhaven/peer (per-rep range) | goal | met |",
           "|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        for i, peer in enumerate(m.peers() or [None]):
            # ratio goals on their peer's row, absolute goals on the first row
            goals = [g for g in m.goals if (g.kind == "<=" and i == 0)
                     or (g.kind != "<=" and g.peer == peer)]
            ratio, paired = ("-", "")
            if peer is not None and m.ratio(peer) is not None:
                pr = m.paired(peer)
                ratio = f"{m.ratio(peer):.2f}x"
                paired = f" ({min(pr):.2f}-{max(pr):.2f})" if pr else ""
            met = " ".join({True: "yes", False: "**NO**", None: "?"}[m.verdict(g)] for g in goals)
            out.append(f"| {m.target} | {m.name} [{m.unit}] | {cell(m.values.get(m.ours))} | "
                       f"{peer or '-'} | {cell(m.values.get(peer)) if peer else '-'} | "
                       f"{ratio}{paired} | {'; '.join(g.text(m.unit) for g in goals) or '-'} "
                       f"| {met or '-'} |")
    return out


class Recorder:
    """Appends JSON lines to `<results>/<stem>.jsonl.tmp`; `close()` renames to `.jsonl`."""

    def __init__(self, stem: str) -> None:
        common.RESULTS.mkdir(parents=True, exist_ok=True)
        self.final = common.RESULTS / f"{stem}.jsonl"
        self.path = Path(str(self.final) + ".tmp")
        self.path.unlink(missing_ok=True)

    def write(self, kind: str, **rec: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, **rec}) + "\n")

    def summary(self, metrics: list[Metric]) -> None:
        for m in metrics:
            self.write("summary", target=m.target, metric=m.name, unit=m.unit, ours=m.ours,
                       values=m.values,
                       ratios={p: m.ratio(p) for p in m.peers()},
                       goals=[{"goal": g.text(m.unit), "met": m.verdict(g)} for g in m.goals])

    def close(self) -> Path:
        if self.path.exists():
            self.path.replace(self.final)
        return self.final
