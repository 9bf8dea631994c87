"""`sir-vllm eval-compare A.json B.json`: do two eval runs pick the same answers?"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-compare", help="agreement of two `sir-vllm eval` result JSONs (same task and subset)",
        description=(
            "Match two result JSONs of one task row by row and print the agreement rate of "
            "their picks, then each disagreement with both runs' margin between their top two "
            "candidates (a near-tie explains a flip). stream-ppl: the two perplexities."),
    )
    p.add_argument("a", type=Path, help="result JSON (sir-vllm eval --out)")
    p.add_argument("b", type=Path, help="result JSON of the same task and subset")
    p.add_argument("--out", type=Path, default=None, help="write the comparison JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import compare, report

    for path in (args.a, args.b):
        if not path.is_file():
            raise FileNotFoundError(f"no such result file: {path}")
    result = compare.compare_files(args.a, args.b)
    print(compare.table(result, names=(args.a.name, args.b.name)
                        if args.a.name != args.b.name else ("A", "B")))
    if args.out:
        report.write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0
