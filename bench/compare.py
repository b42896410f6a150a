"""Several runs side by side: the goal metrics of each results file, one column per run.

    .venv/bin/python bench/compare.py bench/results/*.jsonl

Why: one run's ratio can land on either side of a goal (Postfix's rate swings 20-90 %
between runs here), so the reading of a target should rest on several runs. Each cell is the
value the goal is judged on (a ratio for "ratio" goals, mailhaven's median otherwise) with
"ok"/"NO".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(path: Path, names: dict[str, str]) -> tuple[str, dict[str, str]]:
    meta: dict[str, Any] = {}
    cells: dict[str, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "meta":
            meta = rec
        elif rec["kind"] == "summary":
            for goal in rec["goals"]:
                text = goal["goal"]
                # keyed by the target's number and the goal, so that renamed metrics and the
                # quick/full counts ("2000 idle" / "10000 idle") line up
                key = f"{rec['target'].split('.', 1)[0]}. {rec['metric']} {text}"
                names.setdefault(key.split(" ", 1)[0] + text, key)
                key = names[key.split(" ", 1)[0] + text]
                if "x " in text:  # a ratio goal: ">= 2x postfix-hold"
                    value = rec["ratios"].get(text.rsplit(" ", 1)[1])
                    shown = f"{value:.2f}x" if value is not None else "-"
                else:
                    vals = sorted(rec["values"].get(rec["ours"], []))
                    shown = f"{vals[len(vals) // 2]:g} {rec['unit']}" if vals else "-"
                cells[key] = f"{shown} {'ok' if goal['met'] else 'NO'}"
    mode = path.name.split("-", 1)[0]
    return f"{mode} {meta.get('date', path.stem)} ({meta.get('mailhaven', '?')})", cells


def main() -> int:
    names: dict[str, str] = {}  # the first wording seen of each (target, goal)
    runs = [load(Path(p), names) for p in reversed(sys.argv[1:])][::-1]
    if not runs:
        print(__doc__)
        return 2
    keys = list(dict.fromkeys(k for _, cells in runs for k in cells))
    print("| goal | " + " | ".join(name for name, _ in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(cells.get(k, "-") for _, cells in runs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
