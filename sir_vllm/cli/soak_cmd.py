"""`sir-vllm bench-soak`: many session turns under KV-pool pressure, hostile
traffic between them, and one kill -9 and restart in the middle."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-soak",
        help="a soak: sessions x turns under KV-pool pressure, aborts, bad requests, a restart",
        description=(
            "Start `vllm serve --kv-policy sirllm` with a KV pool too small to pin every session "
            "and a SQLite store in OUT, drive --sessions sessions at once for --turns completions "
            "turns each, with an aborted stream before every --abort-every-th turn and a malformed "
            "request (the fuzzer's) before every --malformed-every-th, and kill -9 the API server "
            "halfway and restart it on the same store. Prints and writes OUT/soak.json: crashes, "
            "5xx, refused turns, turn counts that do not follow, retained tokens above the budget "
            "(all must be 0), pins dropped and recomputed, the API process RSS first/last, and "
            "the pool once every session is deleted (no pin, no block in use). Exit status 1 when "
            "a must-be-zero count is not. Without --model it serves a tiny random model."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint to serve [default: a tiny random Llama made once in the cache]")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=1000, help="turns per session")
    p.add_argument("--prompt-tokens", type=int, default=8, help="new tokens per turn")
    p.add_argument("--max-tokens", type=int, default=4, help="answer tokens per turn")
    p.add_argument("--abort-every", type=int, default=10, help="0: no aborted streams")
    p.add_argument("--malformed-every", type=int, default=7, help="0: no malformed requests")
    p.add_argument("--no-restart", action="store_true", help="no kill -9 halfway")
    p.add_argument("--pool-blocks", type=int, default=6, help="KV pool size in blocks")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--start-size", type=int, default=4)
    p.add_argument("--entropy-size", type=int, default=60)
    p.add_argument("--recent-size", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra `vllm serve` arguments, one string")
    p.add_argument("--server-timeout", type=float, default=900.0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.soak import SoakConfig, failures, run_soak, summary

    cfg = SoakConfig(out=args.out, model=args.model, sessions=args.sessions, turns=args.turns,
                     prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                     abort_every=args.abort_every, malformed_every=args.malformed_every,
                     restart=not args.no_restart, pool_blocks=args.pool_blocks,
                     block_size=args.block_size, max_model_len=args.max_model_len,
                     start_size=args.start_size, entropy_size=args.entropy_size,
                     recent_size=args.recent_size, seed=args.seed,
                     server_args=shlex.split(args.server_args), server_timeout=args.server_timeout)
    results = run_soak(cfg)
    print(summary(results))
    bad = failures(results)
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0
