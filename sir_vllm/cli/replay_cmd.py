"""`sir-vllm replay TRANSCRIPT.jsonl`: one session, greedy answers, one JSON line a turn.

The same transcript through `--backend reference` (the oracle) and
`--backend server` (a live `vllm serve --kv-policy ...`) prints the same lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backend_args import add_backend_args
from .policy_args import add_policy_args, policy_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="feed a transcript's user turns as one session and print each answer",
        description=(
            "Feed the user turns of TRANSCRIPT (JSON lines, {\"user\": \"...\"}) as one session, "
            "answer greedily, and print one JSON line per turn: "
            "{\"turn\", \"answer\", \"token_ids\", \"retained\"} (retained: tokens the session "
            "keeps after the turn)."),
    )
    p.add_argument("transcript", type=Path)
    add_backend_args(p)
    add_policy_args(p)
    p.add_argument("--max-tokens", type=int, default=64, help="answer cap per turn")
    p.set_defaults(run=run)


def read_transcript(path: Path) -> list[str]:
    turns = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns.append(str(row["user"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with a \"user\" field") from None
    if not turns:
        raise ValueError(f"{path}: no turns")
    return turns


def run(args: argparse.Namespace) -> int:
    from ..replay import make_replayer

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.model:
        raise ValueError("--model DIR is needed (the tokenizer, and the weights for reference)")
    policy = policy_from_args(args)
    replayer = make_replayer(args.backend, policy, model=args.model, url=args.url,
                             served_model_name=args.served_model_name, api_key=args.api_key)
    for i, user in enumerate(read_transcript(args.transcript)):
        turn, _ = replayer.turn(user, args.max_tokens)
        print(json.dumps({"turn": i, "answer": turn.answer, "token_ids": turn.token_ids,
                          "retained": turn.retained}), flush=True)
    replayer.close()
    return 0


