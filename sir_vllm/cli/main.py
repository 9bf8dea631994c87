"""`sir-vllm`: prepare models, patch vLLM, evaluate and benchmark policies.

Each subcommand lives in its own module and registers itself with `add_parser`.
"""

from __future__ import annotations

import argparse
import sys

from . import (api_memory_cmd, bench_cmd, compaction_cmd, compare_cmd, eval_cmd, fuzz_cmd, grid_cmd,
               long_turn_cmd, model_cmd, patches_cmd, plot_cmd, replay_cmd, serve_ray_cmd, soak_cmd, store_cmd)

SUBCOMMANDS = [model_cmd, patches_cmd, eval_cmd, compare_cmd, plot_cmd, grid_cmd, replay_cmd, bench_cmd,
               compaction_cmd, api_memory_cmd, store_cmd, long_turn_cmd, serve_ray_cmd, fuzz_cmd, soak_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sir-vllm",
        description=(
            "SirLLM session memory for vLLM. Serve with "
            "`vllm serve MODEL --kv-policy sirllm`; this command prepares "
            "models, applies vLLM patches, evaluates and benchmarks policies."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"sir-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
