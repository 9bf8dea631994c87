"""`sir-vllm eval-grid A.json B.json ... --out grid.png`: the budget's split
between surprisal and recency, measured on recall, Grocery and stream-ppl, with
the split the default-choosing rule picks."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-grid", help="table, plot and rule for SirLLM's budget split (recent share)",
        description=(
            "Line up `sir-vllm eval --out` JSONs of sirllm and streaming runs by the share of "
            "the non-sink budget kept by recency (SirLLM 4+1020+0: 0%%, 4+764+256: 25%%, "
            "StreamingLLM: 100%%) and read one figure from each: recall at distance --k "
            "(recall-distance), ACC_g (grocery, text scoring) or perplexity (stream-ppl). "
            "Prints a Markdown table and the split the rule picks, with the reason: of the "
            "splits measured on every task given, those whose recall and Grocery figures are "
            "within --margin points of the best split's qualify, and the lowest perplexity "
            "among them wins. Writes a plot, one panel per task."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results", type=Path, nargs="+",
                   help="result JSONs: one per (task, split); recall-distance, grocery, stream-ppl")
    p.add_argument("--out", type=Path, default=Path("budget-split.png"), help="the PNG to write")
    p.add_argument("--k", type=int, default=100, help="the recall distance to read")
    p.add_argument("--grocery-dialogues", type=int, default=None,
                   help="read Grocery ACC_g over the first N dialogues of each run, so runs of "
                        "different lengths compare on the same dialogues (default: each run's all)")
    p.add_argument("--margin", type=float, default=2.0,
                   help="points below the best recall / Grocery figure a split may be and still qualify")
    p.add_argument("--title", default=None, help="the plot's title")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import grid

    if args.grocery_dialogues is not None and args.grocery_dialogues < 1:
        raise ValueError(f"--grocery-dialogues must be >= 1, got {args.grocery_dialogues}")
    if args.margin < 0:
        raise ValueError(f"--margin must be >= 0, got {args.margin}")
    splits = grid.build(grid.load(args.results), args.k, args.grocery_dialogues)
    pick, why = grid.choose(splits, args.margin)
    print(grid.table(splits, args.k, pick))
    dialogues = f" (first {args.grocery_dialogues} dialogues)" if args.grocery_dialogues else ""
    print(f"\nGrocery ACC_g{dialogues}; recent share = recent / (entropy + recent).")
    print(f"\nThe rule picks {pick.share:.0%} recent: {why}")
    grid.plot(splits, args.out, args.k, pick, args.title)
    print(f"wrote {args.out}")
    return 0
