"""`sir-vllm bench`: S concurrent chat sessions x T turns against stock vLLM and
the session policies, each on its own `vllm serve` (started here, one at a time)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="throughput of multi-turn chat sessions: sirllm / streaming vs stock vLLM",
        description=(
            "Start one `vllm serve` per policy (one at a time, same model and arguments) and run "
            "S concurrent sessions of T turns against each. Session policies (sirllm, streaming) "
            "send only each new turn with a session_id; stock (`--kv-policy none`, prefix caching "
            "on) gets the whole conversation resent every turn, as clients do today. Every answer "
            "is exactly --max-tokens tokens (greedy, ignore_eos). Reports turns/s, output tokens/s, "
            "TTFT and turn latency (p50/p99), latency against the turn number, KV tokens held per "
            "session, and the turn at which stock vLLM fails (max_model_len). Writes results.json, "
            "results.md, turns.jsonl, latency_vs_turn.png (and throughput_vs_sessions.png for a "
            "list of --sessions) into --out. TTFT = turn latency minus the server's decode "
            "interval (servers started here run with --enable-per-request-metrics)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="checkpoint folder served by every policy (also the client's tokenizer)")
    p.add_argument("--sessions", default="4",
                   help="concurrent sessions; a comma list (1,4,8) sweeps them on each server")
    p.add_argument("--turns", type=int, default=8, help="turns per session")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens in every answer")
    p.add_argument("--policies", default=None,
                   help="comma list of sirllm, streaming, stock (alias none) "
                        "[default: sirllm,streaming,stock; sirllm with --one-session-turns]")
    p.add_argument("--out", "--result-dir", dest="out", type=Path, required=True,
                   help="output folder")
    g = p.add_argument_group("session policies")
    g.add_argument("--budget", default="4+1020",
                   help="START+ENTROPY[+RECENT] tokens (sirllm's knobs); streaming keeps START "
                        "sinks + the rest of the same total as its recent window")
    g.add_argument("--decay", type=float, default=1.0, help="sirllm's per-turn score decay")
    w = p.add_argument_group("workload")
    w.add_argument("--seed", type=int, default=0, help="fixes the user turns of every session")
    w.add_argument("--synthetic", action="store_true",
                   help="random-word user turns instead of DailyDialog text")
    w.add_argument("--synthetic-words", type=int, default=16, help="mean words per synthetic turn")
    w.add_argument("--data", type=Path, default=None,
                   help="DailyDialog raw text (dialogues_*.txt) [default: the shared data folder's "
                        "dialogues_test.txt]")
    w.add_argument("--max-user-tokens", type=int, default=128,
                   help="cut longer user messages to this many tokens (0: no cut)")
    w.add_argument("--one-session-turns", type=int, default=None, metavar="N",
                   help="bounded-memory run: one session of N turns (overrides --sessions/--turns); "
                        "prints turn-100 vs turn-N latency and the peak retained tokens vs budget")
    s = p.add_argument_group("servers")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="--max-model-len of every server (stock fails past it) [default: the model's]")
    s.add_argument("--server-args", default="",
                   help="extra `vllm serve` arguments for every server, one string "
                        "(e.g. \"--kv-cache-memory-bytes 4G\")")
    s.add_argument("--url-per-policy", default=None,
                   help="reuse running servers instead of starting them: POLICY=URL,... "
                        "(e.g. sirllm=http://127.0.0.1:8001,stock=http://127.0.0.1:8000)")
    s.add_argument("--served-model-name", default=None,
                   help="model name on the servers [default: the model folder's name; "
                        "a URL server's first model]")
    s.add_argument("--api-key", default="unused")
    s.add_argument("--num-warmups", type=int, default=2,
                   help="warm-up turns (one throw-away session) before each server's runs")
    s.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds to wait for a server to start")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    from ..bench.runner import (DEFAULT_POLICIES, BenchConfig, parse_budget, parse_policies,
                                parse_sessions, parse_urls)

    memory = args.one_session_turns
    if memory is not None and memory < 1:
        raise ValueError(f"--one-session-turns must be >= 1, got {memory}")
    policies = parse_policies(args.policies or ("sirllm" if memory else ",".join(DEFAULT_POLICIES)))
    cfg = BenchConfig(
        model=str(args.model),
        sessions=[1] if memory else parse_sessions(args.sessions),
        turns=memory or args.turns,
        max_tokens=args.max_tokens,
        policies=policies,
        out=Path(args.out),
        budget=parse_budget(args.budget),
        decay=args.decay,
        seed=args.seed,
        max_model_len=args.max_model_len,
        urls=parse_urls(args.url_per_policy),
        synthetic=args.synthetic,
        synthetic_words=args.synthetic_words,
        data=args.data,
        max_user_tokens=args.max_user_tokens or None,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        num_warmups=args.num_warmups,
        server_args=shlex.split(args.server_args or ""),
        server_timeout=args.server_timeout,
        memory_turns=memory,
        progress=not args.no_progress,
    )
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..bench.runner import run_bench

    run_bench(config_from_args(args))
    return 0
