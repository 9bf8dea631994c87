"""`sir-vllm eval-compare A.json B.json [A2.json B2.json ...]`: do two eval runs
pick the same answers, and is one right more often?"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-compare", help="agreement of two `sir-vllm eval` result JSONs (same task and subset)",
        description=(
            "Match two result JSONs of one task row by row and print the agreement rate of "
            "their picks, how often each is right where the other is not (McNemar's exact "
            "test, per row kind), then each disagreement with both runs' margin between their "
            "top two candidates (a near-tie explains a flip). stream-ppl: the two perplexities. "
            "More pairs (A2 B2 ...: say the same two policies on another seed's facts) are "
            "compared pair by pair and their paired counts pooled into one test."),
    )
    p.add_argument("runs", type=Path, nargs="+", metavar="A B",
                   help="result JSONs (sir-vllm eval --out), in pairs of the same task and subset")
    p.add_argument("--out", type=Path, default=None,
                   help="write the comparison JSON here (several pairs: each, and the pooled counts)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import compare, report

    if len(args.runs) < 2 or len(args.runs) % 2:
        raise ValueError(f"eval-compare takes result files in pairs (A B [A2 B2 ...]), "
                         f"got {len(args.runs)}")
    for path in args.runs:
        if not path.is_file():
            raise FileNotFoundError(f"no such result file: {path}")
    pairs = list(zip(args.runs[::2], args.runs[1::2]))
    results = []
    for i, (a, b) in enumerate(pairs):
        if i:
            print()
        results.append(compare.compare_files(a, b))
        print(compare.table(results[-1], names=(a.name, b.name) if a.name != b.name else ("A", "B")))
    out = results[0]
    if len(pairs) > 1:
        pooled = compare.pool(results)
        print(f"\npooled over {len(pairs)} pairs (first run of each pair = A):")
        print("\n".join(compare.paired_lines(pooled, ("A", "B"))))
        out = {"pairs": results, "pooled": pooled}
    if args.out:
        report.write_json(out, args.out)
        print(f"wrote {args.out}")
    return 0
