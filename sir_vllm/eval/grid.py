"""The budget's split between surprisal and recency: one table, one plot, one rule.

Each result JSON (`sir-vllm eval ... --out`) is one split measured on one task:
recall at one distance (`recall-distance`), Grocery `text` (`grocery`, ACC_g)
or stream perplexity (`stream-ppl`). Splits are lined up by the share of the
non-sink budget given to recent tokens (SirLLM 4+764+256: 25%; StreamingLLM:
100%), so a grid measured at budget 512 on one task and 1,024 on another still
lines up. The rule that picks the default: a split qualifies when each memory
figure (recall, Grocery) is within `margin` points of that figure's best split;
of those, the lowest perplexity wins (ties: the smaller recent share; with no
perplexity results, the smallest worst shortfall wins). Where no split is
within the margin on every memory figure, the margin widens to the smallest
worst shortfall any split has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .report import read_results
from .tasks import grocery_metrics

# measure name -> (task, column heading, higher is better)
MEASURES = {
    "recall": ("recall-distance", "recall k={k} (%)", True),
    "grocery": ("grocery", "Grocery ACC_g (%)", True),
    "ppl": ("stream-ppl", "stream-ppl", False),
}
TASK_MEASURE = {task: name for name, (task, _, _) in MEASURES.items()}


def recent_share(policy: dict) -> float:
    """The share of the non-sink budget kept by recency: 0 for SirLLM 4+1020+0, 1 for StreamingLLM."""
    if policy["name"] == "streaming":
        return 1.0
    if policy["name"] != "sirllm":
        raise ValueError(f"a {policy['name']!r} result has no budget split; eval-grid takes "
                         f"sirllm and streaming results")
    room = policy["entropy_size"] + policy["recent_size"]
    if room <= 0:
        raise ValueError(f"SirLLM {policy['start_size']}+0+0 has no budget to split")
    return policy["recent_size"] / room


def split_label(policy: dict) -> str:
    if policy["name"] == "streaming":
        return f"StreamingLLM {policy['start_size']}+{policy['recent_size']}"
    return f"{policy['start_size']}+{policy['entropy_size']}+{policy['recent_size']}"


def first_dialogues(predictions: list[dict], n: int) -> list[dict]:
    """Grocery predictions of the first n dialogues (episode `grocery-<i>`, i < n)."""
    def index(p):
        m = re.fullmatch(r"grocery-(\d+)", p["episode"])
        if not m:
            raise ValueError(f"episode {p['episode']!r} is not named grocery-<index>")
        return int(m.group(1))
    return [p for p in predictions if index(p) < n]


def measure(result: dict, k: int, grocery_dialogues: int | None) -> float:
    """The figure the grid reads from one result: recall % at distance k, Grocery
    ACC_g % (over the first `grocery_dialogues` dialogues when given), or PPL."""
    task, m = result["task"], result["metrics"]
    if task == "recall-distance":
        row = m["per_k"].get(str(k))
        if row is None or "skipped" in row:
            raise ValueError(f"{result['_file']}: no recall measured at k={k} "
                             f"(measured: {', '.join(m['per_k'])}; choose one with --k)")
        return 100 * row["acc"]
    if task == "grocery":
        if result.get("scoring") != "text":
            raise ValueError(f"{result['_file']}: Grocery with {result.get('scoring')} scoring; "
                             f"the grid reads `text` scoring")
        if grocery_dialogues is None:
            return 100 * m["acc_g"]
        if m["n_dialogues"] < grocery_dialogues:
            raise ValueError(f"{result['_file']}: {m['n_dialogues']} dialogues, fewer than "
                             f"--grocery-dialogues {grocery_dialogues}")
        return 100 * grocery_metrics(first_dialogues(result["predictions"], grocery_dialogues))["acc_g"]
    return m["ppl"]


@dataclass
class Split:
    """One recent share, with the figure of each measure that has a result for it."""

    share: float
    labels: dict[str, str] = field(default_factory=dict)   # measure -> "4+764+256"
    values: dict[str, float] = field(default_factory=dict)  # measure -> figure


def load(paths: list[Path]) -> list[dict]:
    return read_results(paths, tuple(TASK_MEASURE),
                        f"eval-grid reads {', '.join(TASK_MEASURE)} results")


def build(results: list[dict], k: int = 100, grocery_dialogues: int | None = None) -> list[Split]:
    """The grid: a Split per recent share, to the nearest 5% (so 4+252+768 at budget
    1,024 and 4+124+384 at 512, 75.3% and 75.6%, are one row), in order of share."""
    splits: dict[float, Split] = {}
    seen: dict[tuple[str, float], str] = {}
    for r in results:
        name = TASK_MEASURE[r["task"]]
        share = round(20 * recent_share(r["policy"])) / 20
        if (name, share) in seen:
            raise ValueError(f"two {name} results for a {share:.0%} recent share: "
                             f"{seen[name, share]} and {r['_file']}")
        seen[name, share] = r["_file"]
        s = splits.setdefault(share, Split(share))
        s.labels[name] = split_label(r["policy"])
        s.values[name] = measure(r, k, grocery_dialogues)
    return [splits[s] for s in sorted(splits)]


def measured(splits: list[Split]) -> list[str]:
    """The measures that at least one split has a figure for, in MEASURES' order."""
    return [n for n in MEASURES if any(n in s.values for s in splits)]


def choose(splits: list[Split], margin: float = 2.0) -> tuple[Split, str]:
    """The default by the module's rule, and the reason in words. Only splits
    measured on every measure present compete."""
    present = measured(splits)
    complete = [s for s in splits if all(n in s.values for n in present)]
    if not complete:
        raise ValueError("no split has a result for every measure given "
                         f"({', '.join(present)}): nothing to choose from")
    memory = [n for n in present if MEASURES[n][2]]
    best = {n: max(s.values[n] for s in complete) for n in memory}

    def shortfall(s: Split) -> float:  # points below the best, on the worst memory measure
        return max((best[n] - s.values[n] for n in memory), default=0.0)

    # Where no split is within the margin on every memory measure, the margin
    # widens to the smallest worst shortfall any split has.
    reach = max(margin, min(shortfall(s) for s in complete))
    ok = [s for s in complete if shortfall(s) <= reach + 1e-9]
    if "ppl" in present:
        pick = min(ok, key=lambda s: (s.values["ppl"], s.share))
    else:  # nothing to trade memory for: the one that remembers the most
        pick = min(ok, key=lambda s: (shortfall(s), s.share))
    within = ", ".join(f"{n} within {reach:g} points of the best ({best[n]:.1f})" for n in memory)
    if reach > margin:
        within += f" (no split is within {margin:g} on every one; the margin widened to the smallest worst shortfall)"
    others = [s for s in complete if s not in ok]
    why = (f"{len(ok)} of {len(complete)} splits keep {within or 'every measure'}: "
           f"{', '.join(_name(s) for s in ok)}")
    why += (f"; the lowest stream-ppl among them: {_name(pick)}" if "ppl" in present
            else f"; no stream-ppl to weigh, so the one nearest the best memory: {_name(pick)}")
    if others:
        why += ("; left out for memory: " + ", ".join(
            f"{_name(s)} (" + ", ".join(f"{n} {s.values[n]:.1f}" for n in memory) + ")"
            for s in others))
    missing = [s for s in splits if s not in complete]
    if missing:
        why += "; not compared, a measure missing: " + ", ".join(
            f"{_name(s)} (no {', '.join(n for n in present if n not in s.values)})" for s in missing)
    return pick, why + "."


def _name(s: Split) -> str:
    return f"{s.share:.0%} recent"


def _fmt(name: str, value: float) -> str:
    return f"{value:.2f}" if name == "ppl" else f"{value:.1f}"


def table(splits: list[Split], k: int = 100, pick: Split | None = None) -> str:
    """Markdown: a row per recent share; each measure's figure with the split it was measured at."""
    present = measured(splits)
    heads = [MEASURES[n][1].format(k=k) for n in present]
    lines = ["| recent share | " + " | ".join(heads) + " |", "|---|" + "---|" * len(present)]
    for s in splits:
        mark = " **(rule's pick)**" if s is pick else ""
        cells = [f"{_fmt(n, s.values[n])} ({s.labels[n]})" if n in s.values else "–"
                 for n in present]
        lines.append(f"| {s.share:.0%}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(splits: list[Split], path: Path, k: int = 100, pick: Split | None = None,
         title: str | None = None) -> None:
    """One panel per measure against the recent share; the rule's pick marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = measured(splits)
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 4), squeeze=False)
    for ax, name in zip(axes[0], present):
        xs = [100 * s.share for s in splits if name in s.values]
        ys = [s.values[name] for s in splits if name in s.values]
        ax.plot(xs, ys, marker="o")
        for s in splits:  # each point names the split it was measured at
            if name in s.values:
                ax.annotate(s.labels[name].replace("StreamingLLM ", "SLLM "),
                            (100 * s.share, s.values[name]), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize=7)
        if pick is not None and name in pick.values:
            ax.plot([100 * pick.share], [pick.values[name]], marker="*", markersize=16,
                    color="tab:red", linestyle="none", label="rule's pick")
            ax.legend(fontsize=8, loc="upper right")
        if name == "recall":  # 4 candidates: chance 25%
            ax.axhline(25, color="grey", linestyle="--", linewidth=1)
        ax.margins(x=0.08, y=0.15)  # room for the labels above the points
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.set_xlabel("recent share of the budget (%)")
        ax.set_title(MEASURES[name][1].format(k=k) + (", chance 25%" if name == "recall" else ""),
                     fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "SirLLM's budget split: surprisal slots against recent window")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
