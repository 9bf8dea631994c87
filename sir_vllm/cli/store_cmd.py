"""`sir-vllm bench-store`: what each session store costs per operation."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-store",
        help="micro-benchmark: the session stores' cost per put, get and lease+release",
        description=(
            "Time the session stores (--kv-session-store memory, sqlite:PATH, redis://...) on a "
            "realistic state: a SirLLM session at its budget with K rollback snapshots, every "
            "snapshot full (default: budget 1024, K = 4, about 80 KB stored). Each put (a turn's "
            "commit on an existing session), get (a turn's load) and lease+release (a turn's "
            "lock) is awaited alone from an asyncio loop, as the server awaits it; the table "
            "gives p50 and p99 in ms. Redis: --redis URL (its own key prefix, removed after), "
            "else a throwaway redis-server with no persistence when one is installed. Does not "
            "import vLLM."),
    )
    p.add_argument("--backends", default="memory,sqlite,redis",
                   help="comma list of memory, sqlite, redis [default: all three]")
    p.add_argument("--budget", type=int, default=1024, help="tokens per snapshot [default: 1024]")
    p.add_argument("--snapshots", type=int, default=4,
                   help="K, rollback snapshots besides the head [default: 4]")
    p.add_argument("--sessions", type=int, default=64, help="sessions visited in turn [default: 64]")
    p.add_argument("--iters", type=int, default=500, help="timed operations of each kind [default: 500]")
    p.add_argument("--warmup", type=int, default=50, help="untimed operations first [default: 50]")
    p.add_argument("--sqlite", type=Path, default=None,
                   help="the SQLite file to use [default: one in a temporary folder]")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="redis://HOST:PORT/DB [default: a throwaway local redis-server]")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.store_cost import StoreCostConfig, format_table, run_store_cost, write_json

    cfg = StoreCostConfig(backends=[b.strip() for b in args.backends.split(",") if b.strip()],
                          budget=args.budget, snapshots=args.snapshots, sessions=args.sessions,
                          iters=args.iters, warmup=args.warmup, sqlite_path=args.sqlite,
                          redis_url=args.redis)
    result = run_store_cost(cfg)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"results: {args.json}")
    return 0
