"""`sir-vllm bench-long-turn`: one session fed far past its budget, then one long answer (issue 17)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-long-turn",
        help="one session of 1M input tokens and a 10K-token answer: bounded KV, flat time and memory",
        description=(
            "Start one `vllm serve --kv-policy sirllm` (the budget's knobs) and feed one session "
            "--input-tokens token ids of DailyDialog text (repeated) as completions turns of "
            "--turn-tokens each, then ask it for one streamed answer of --answer-tokens tokens "
            "(ignore_eos). Every turn is longer than the budget, so the server runs it in passes of "
            "--chunk-tokens (its input in prefill chunks, the answer in segments), each evicting "
            "as the policy says. Input turns are prefill turns (max_tokens 0): the session keeps "
            "exactly the text fed and a turn's time is its prefill alone. Records per turn the "
            "latency, ms per 1K tokens, retained_tokens and chunks; each answer token's arrival; "
            "the RSS of the API server, EngineCore and worker processes after every turn and "
            "every --answer-window-tokens output tokens. Prints max retained vs budget (the run "
            "fails if any turn kept more), ms per 1K tokens over the first vs the last window of "
            "input and of output with their ratio, RSS first/halfway/last per process; writes "
            "results.json, "
            "results.md, long_turn.png and server.log into --out. The full run (1M tokens, "
            "10K answer, 4+1020) is long on a 2-core CPU: see docs/results/long-turn/."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (also the tokenizer)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    w = p.add_argument_group("the session")
    w.add_argument("--input-tokens", type=int, default=1_000_000, help="token ids fed in all")
    w.add_argument("--turn-tokens", type=int, default=10_000,
                   help="token ids per input turn (above the budget, so each runs in chunks); the first "
                        "turn tops the opening pass up to this many")
    w.add_argument("--answer-tokens", type=int, default=10_000,
                   help="tokens of the final streamed answer (above the budget: it runs in segments)")
    w.add_argument("--data", type=Path, default=None,
                   help="DailyDialog raw text (dialogues_*.txt) [default: the shared data folder's "
                        "dialogues_test.txt]")
    g = p.add_argument_group("server (vllm serve --kv-policy sirllm)")
    g.add_argument("--budget", default="4+1020",
                   help="START+ENTROPY[+RECENT]: --kv-start-size, --kv-entropy-size, --kv-recent-size")
    g.add_argument("--decay", type=float, default=1.0, help="--kv-decay")
    g.add_argument("--chunk-tokens", type=int, default=None,
                   help="--kv-chunk-tokens [default: the server's, a quarter of the room beside the sinks]")
    g.add_argument("--store", choices=("memory", "sqlite"), default="memory",
                   help="--kv-session-store: memory, or sqlite (a file of this run's own in OUT)")
    g.add_argument("--max-model-len", type=int, default=None, help="--max-model-len [default: the model's]")
    g.add_argument("--server-args", default="",
                   help="extra `vllm serve` arguments, one string; write --server-args=\"--enforce-eager\" "
                        "(with '=') when it starts with --")
    g.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds to wait for the server to start")
    m = p.add_argument_group("figures")
    m.add_argument("--window-tokens", type=int, default=10_000,
                   help="ms per 1K input tokens over the first vs the last this many tokens")
    m.add_argument("--answer-window-tokens", type=int, default=1_000,
                   help="ms per 1K output tokens over the answer's first vs last this many tokens; "
                        "also the blocks the answer's time and RSS are sampled in")
    m.add_argument("--flat-ratio", type=float, default=1.10,
                   help="the verdicts' bound on last/first time and last/halfway RSS (reported, not "
                        "enforced: only retained tokens above the budget fail the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    from ..bench.long_turn import LongTurnConfig
    from ..bench.runner import parse_budget

    cfg = LongTurnConfig(
        model=args.model, out=args.out, input_tokens=args.input_tokens, turn_tokens=args.turn_tokens,
        answer_tokens=args.answer_tokens, budget=parse_budget(args.budget), decay=args.decay,
        chunk_tokens=args.chunk_tokens, data=args.data, window_tokens=args.window_tokens,
        answer_window_tokens=args.answer_window_tokens, store=args.store,
        max_model_len=args.max_model_len, server_args=shlex.split(args.server_args or ""),
        server_timeout=args.server_timeout, flat_ratio=args.flat_ratio, progress=not args.no_progress)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..bench.long_turn import run_long_turn

    run_long_turn(config_from_args(args))
    return 0
