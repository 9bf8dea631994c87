"""`sir-vllm eval-plot A.json B.json ... --out recall.png`: recall against
distance, a line per run (one result JSON per policy)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-plot", help="plot recall-distance results (accuracy against k, a line per run)",
        description=(
            "Combine `sir-vllm eval recall-distance --out` JSONs (one per policy, the same "
            "facts) into one Markdown table (a row per run, a column per distance) and one "
            "PNG: recall accuracy against k, and the share of facts still in the cache when "
            "asked, a line per run. Distances a run skipped (the full cache past the model's "
            "window) are gaps."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results", type=Path, nargs="+", help="recall-distance result JSONs")
    p.add_argument("--out", type=Path, default=Path("recall-distance.png"), help="the PNG to write")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one legend label per result (default: each run's policy)")
    p.add_argument("--title", default=None, help="the plot's title")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import plot

    if args.labels is not None and len(args.labels) != len(args.results):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.results)} results")
    results = plot.load_results(args.results)
    print(plot.table(results, args.labels))
    plot.plot(results, args.out, args.labels, args.title)
    print(f"wrote {args.out}")
    return 0
