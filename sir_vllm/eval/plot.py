"""Several recall-distance results side by side: one table, one plot.

Each result JSON (`sir-vllm eval recall-distance --out`) is one run, one
policy: a line of accuracy against the distance k, beside the share of facts
still in the cache when asked. A distance a run skipped (the full cache past
the model's window) is a gap in its line and a "skipped" cell in the table.
"""

from __future__ import annotations

import math
from pathlib import Path

from .report import policy_label, read_results


def load_results(paths: list[Path]) -> list[dict]:
    return read_results(paths, ("recall-distance",), "eval-plot draws recall-distance results")


def run_label(result: dict) -> str:
    label = policy_label(result["policy"])
    return label if result.get("backend", "reference") == "reference" else f"{label} [server]"


def _series(result: dict, key: str) -> tuple[list[int], list[float]]:
    ks, ys = [], []
    for k, row in result["metrics"]["per_k"].items():
        ks.append(int(k))
        ys.append(math.nan if "skipped" in row else row[key])
    return ks, ys


def _cell(row: dict) -> str:
    if "skipped" in row:
        return "skipped"
    return f"{100 * row['acc']:.1f} ({100 * row['fact_in_cache']:.0f}%, n={row['n_facts']})"


def table(results: list[dict], labels: list[str] | None = None) -> str:
    """Markdown: a row per run, a column per distance; each cell is the
    accuracy, the share of facts in the cache when asked, and the facts."""
    labels = labels or [run_label(r) for r in results]
    ks = sorted({int(k) for r in results for k in r["metrics"]["per_k"]})
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for label, r in zip(labels, results):
        per_k = r["metrics"]["per_k"]
        lines.append(f"| {label} | " + " | ".join(_cell(per_k[str(k)]) if str(k) in per_k else "–"
                                                 for k in ks) + " |")
    lines.append("\ncells: accuracy % (facts still in the cache when asked, facts asked); "
                 "chance 25%")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, labels: list[str] | None = None,
         title: str | None = None) -> None:
    """Accuracy against k (left) and the fact still in the cache (right), a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [run_label(r) for r in results]
    fig, (acc_ax, held_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, r in zip(labels, results):
        for ax, key in ((acc_ax, "acc"), (held_ax, "fact_in_cache")):
            ks, ys = _series(r, key)
            ax.plot(ks, [100 * y for y in ys], marker="o", label=label)
    chance = 100 * results[0]["metrics"].get("chance", 0.25) if results else 25
    acc_ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    budgets = {r["policy"].get("cache_size") for r in results} - {None}
    ks = sorted({int(k) for r in results for k in r["metrics"]["per_k"]})
    axes = ((acc_ax, "recall accuracy (%)"), (held_ax, "fact in the cache when asked (%)"))
    for ax, what in axes:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        if ks:  # room beside the first and last distance (symlog: 0 is allowed)
            ax.set_xlim(-0.3 if ks[0] == 0 else ks[0] / 1.5, ks[-1] * 1.5)
        ax.set_xlabel("k: filler turns between the fact and the question")
        ax.set_ylabel(what)
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower left")
    budget = f", budget {', '.join(map(str, sorted(budgets)))}" if budgets else ""
    fig.suptitle(title or f"Recall against distance{budget}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
