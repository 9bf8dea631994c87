"""`sir-vllm bench`: S concurrent chat sessions x T turns against stock vLLM and
the session policies, each on its own `vllm serve` (started here, one at a time)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench.runner import default_policies, policy_choices
    from ..policy.registry import argparse_help

    p = sub.add_parser(
        "bench", help="throughput of multi-turn chat sessions: sirllm / streaming vs stock vLLM",
        description=(
            "Start one `vllm serve` per policy (one at a time, same model and arguments) and run "
            "S concurrent sessions of T turns against each. Session policies (sirllm, streaming) "
            "send only each new turn with a session_id; stock (`--kv-policy none`, prefix caching "
            "on) gets the whole conversation resent every turn, as clients do today. Every answer "
            "is exactly --max-tokens tokens (greedy, ignore_eos). Every policy streams "
            "(stream_options.include_usage: the usage and a session's `session` object come in "
            "the last chunk): TTFT = request sent -> first chunk with a token, TPOT = (last token "
            "- first token) / (output tokens - 1), measured on the client as `vllm bench serve` "
            "does; --no-stream asks whole responses instead and estimates TTFT as the turn latency "
            "minus the server's decode interval (servers started here run with "
            "--enable-per-request-metrics). Reports turns/s, output tokens/s, TTFT, TPOT and turn "
            "latency (p50/p99), latency and TTFT against the turn number, KV tokens held per "
            "session, and the turn at which stock vLLM fails (max_model_len). Writes results.json, "
            "results.md, turns.jsonl, latency_vs_turn.png, ttft_vs_turn.png (and "
            "throughput_vs_sessions.png for a list of --sessions) into --out. Issue 11's TTFT "
            "figure: run once streamed and once --no-stream with the same settings, the second "
            "with --compare-with the first's folder (adds ttft_by_mode.png and a table)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="checkpoint folder served by every policy (also the client's tokenizer)")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="default",
                   help="pressure: S sessions x T turns that outgrow the KV pool (issue 14): every "
                        "server's --kv-cache-memory-bytes holds --pressure-fraction of the largest "
                        "run's full histories, each number of sessions runs its own sessions, and "
                        "the report adds preemptions, prefix-cache hit rate, sessions pinned vs "
                        "recomputed (defaults: " + _defaults_text("pressure") + ")")
    p.add_argument("--pressure-fraction", type=float, default=0.25,
                   help="pressure scenario: the share of the largest run's histories the KV pool holds")
    p.add_argument("--sessions", default=None,
                   help="concurrent sessions; a comma list (1,4,8) sweeps them on each server "
                        "[default: 4; pressure: 4,16,64]")
    p.add_argument("--turns", type=int, default=None, help="turns per session [default: 8; pressure: 16]")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens in every answer [default: 64; pressure: 32]")
    p.add_argument("--policies", default=None,
                   help=argparse_help(f"comma list of {policy_choices()} (default: "
                                      f"{','.join(default_policies())}; sirllm with "
                                      "--one-session-turns)"))
    p.add_argument("--out", "--result-dir", dest="out", type=Path, required=True,
                   help="output folder")
    m = p.add_argument_group("measurement")
    m.add_argument("--no-stream", dest="stream", action="store_false",
                   help="whole responses instead of streams (the measurement from before sessions "
                        "could stream): TTFT and TPOT estimated from the server's per-request "
                        "metrics")
    m.add_argument("--compare-with", type=Path, default=None, metavar="DIR",
                   help="a finished run of the other streaming mode with the same turns (model, "
                        "sessions, turns, tokens, budget, seed, workload): adds the time to first "
                        "token streamed vs not (and vs stock) to results.md/json and "
                        "ttft_by_mode.png")
    g = p.add_argument_group("session policies")
    g.add_argument("--budget", default=None,
                   help="START+ENTROPY[+RECENT] tokens (sirllm's knobs); streaming keeps START "
                        "sinks + the rest of the same total as its recent window "
                        "[default: 4+1020; pressure: 4+252]")
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


# what an unset --sessions/--turns/--max-tokens/--budget means, per scenario
SCENARIOS = {
    "default": {"sessions": "4", "turns": 8, "max_tokens": 64, "budget": "4+1020"},
    "pressure": {"sessions": "4,16,64", "turns": 16, "max_tokens": 32, "budget": "4+252"},
}


def _defaults_text(scenario: str) -> str:
    d = SCENARIOS[scenario]
    return (f"--sessions {d['sessions']} --turns {d['turns']} --max-tokens {d['max_tokens']} "
            f"--budget {d['budget']}")


def _resolve_scenario(args: argparse.Namespace) -> None:
    for key, value in SCENARIOS[getattr(args, "scenario", "default")].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def config_from_args(args: argparse.Namespace):
    from ..bench.runner import (BenchConfig, default_policies, parse_budget, parse_policies,
                                parse_sessions, parse_urls)

    _resolve_scenario(args)
    memory = args.one_session_turns
    pressure = args.pressure_fraction if args.scenario == "pressure" else None
    if pressure is not None and memory:
        raise ValueError("--scenario pressure and --one-session-turns do not go together")
    if memory is not None and memory < 1:
        raise ValueError(f"--one-session-turns must be >= 1, got {memory}")
    policies = parse_policies(args.policies or ("sirllm" if memory else ",".join(default_policies())))
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
        stream=args.stream,
        compare_with=args.compare_with,
        pressure=pressure,
    )
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..bench.runner import run_bench

    run_bench(config_from_args(args))
    return 0
