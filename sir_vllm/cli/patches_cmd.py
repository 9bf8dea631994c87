"""`sir-vllm patches apply|check`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patches",
        help="apply the repository's patches/ to the installed vLLM",
        description="Apply (or check) the patches in patches/ to the installed vLLM. Idempotent.",
    )
    p.add_argument("action", choices=["apply", "check"], help="apply pending patches, or only report")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..setup.patches import apply_all

    results = apply_all(check_only=args.action == "check")
    bad = 0
    for r in results:
        print(f"{r.name}: {r.state}" + (f"\n  {r.detail}" if r.detail else ""))
        bad += r.state in ("conflict",) or (args.action == "check" and r.state == "pending")
    return 1 if bad else 0
