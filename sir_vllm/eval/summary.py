"""Combine result JSONs (`sir-vllm eval --out`) into one Markdown table per
task and scoring mode: `python -m sir_vllm.eval.summary DIR [DIR ...]`."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .report import table


def load(dirs: list[Path]) -> list[dict]:
    results = []
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            r = json.loads(path.read_text())
            r["_file"] = str(path)
            results.append(r)
    return results


def summarize(results: list[dict]) -> str:
    groups = defaultdict(list)
    for r in results:
        groups[(r["task"], r.get("scoring") or "-", r.get("backend", "reference"))].append(r)
    out = []
    for (task, scoring, backend), rows in sorted(groups.items()):
        out.append(f"### {task}, scoring {scoring}, backend {backend}\n")
        lines = [[ln for ln in table(r).splitlines() if ln.startswith("|")] for r in rows]
        out.append("\n".join(lines[0][:2] + [ln for t in lines for ln in t[2:]]))
        for r in rows:
            out.append(f"\n- `{r['_file']}`: {r['seconds']:.0f} s, {r['date']}, limit {r['limit']}")
        out.append("\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(load([Path(a) for a in sys.argv[1:]] or [Path("docs/results/oracle")])))
