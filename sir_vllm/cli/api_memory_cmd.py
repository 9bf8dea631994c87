"""`sir-vllm bench-api-memory`: the API server process's RSS over many session turns."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-api-memory",
        help="API server memory (RSS) over one long session and many one-turn sessions",
        description=(
            "Start one `vllm serve --kv-policy sirllm` with a small budget and a session cap, "
            "drive it as fast as it goes with one-token answers, and read the API server "
            "process's VmRSS (/proc/PID/status of the `vllm serve` process started here, not "
            "EngineCore or its worker) every N turns: (a) one session of --turns turns, then "
            "(b) --sessions one-turn sessions, --concurrency at once (past --max-sessions each "
            "new one drops the least recently used). Prints the samples and a verdict per part "
            "(RSS at 25/50/75/100% of the part, last/halfway: flat when at most --flat-ratio), "
            "checks the cap in the server log, and writes api_memory.json, api_memory.png (RSS "
            "against turns) and server.log into --out. Without --model it serves a tiny random "
            "model (made once under ~/.cache/sir-vllm/models; the answers are noise, the memory "
            "is real). "
            "The full run (10,000 turns, 20,000 sessions) takes 13 minutes on 2 busy cores "
            "(17 with --store sqlite)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint to serve [default: a tiny random Llama, head_dim 64, made once in "
                        "~/.cache/sir-vllm/models/tiny-llama-head64]")
    p.add_argument("--turns", type=int, default=10_000,
                   help="part (a): turns of the one long session (0: skip the part)")
    p.add_argument("--sessions", type=int, default=20_000,
                   help="part (b): one-turn sessions (0: skip the part)")
    p.add_argument("--concurrency", type=int, default=4, help="part (b): requests in flight")
    p.add_argument("--sample-every", type=int, default=None, metavar="N",
                   help="turns between RSS samples [default: a 50th of each part]")
    p.add_argument("--prompt-tokens", type=int, default=8, help="new tokens per turn")
    g = p.add_argument_group("server (vllm serve --kv-policy sirllm)")
    g.add_argument("--start-size", type=int, default=4, help="--kv-start-size (attention sinks)")
    g.add_argument("--entropy-size", type=int, default=60, help="--kv-entropy-size")
    g.add_argument("--max-sessions", type=int, default=1000,
                   help="--kv-max-sessions: the store's cap (part (b) should pass it)")
    g.add_argument("--store", choices=("memory", "sqlite"), default="memory",
                   help="--kv-session-store: memory (the states in the API process) or sqlite (a "
                        "file of this run's own in OUT, not the host's shared default file)")
    g.add_argument("--server-args", default="",
                   help="extra `vllm serve` arguments, one string")
    g.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds to wait for the server to start")
    p.add_argument("--flat-ratio", type=float, default=1.10,
                   help="the verdict's bound on RSS at the end over RSS halfway")
    p.add_argument("--seed", type=int, default=0, help="fixes the prompts' token ids")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    from ..bench.api_memory import MemoryConfig

    cfg = MemoryConfig(
        out=args.out, model=args.model, turns=args.turns, sessions=args.sessions,
        concurrency=args.concurrency, sample_every=args.sample_every,
        start_size=args.start_size, entropy_size=args.entropy_size,
        max_sessions=args.max_sessions, store=args.store, prompt_tokens=args.prompt_tokens,
        seed=args.seed,
        server_args=shlex.split(args.server_args or ""), server_timeout=args.server_timeout,
        flat_ratio=args.flat_ratio, progress=not args.no_progress)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..bench.api_memory import run_api_memory

    run_api_memory(config_from_args(args))
    return 0
