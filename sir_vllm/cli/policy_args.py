"""The policy flags shared by `eval` and `replay` (the server's flags mirror them)."""

from __future__ import annotations

import argparse

from ..policy import POLICY_ALIASES, POLICY_NAMES, SCORE_VARIANTS, Policy, make_policy


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV policy")
    g.add_argument("--policy", required=True, choices=[*POLICY_NAMES, *POLICY_ALIASES],
                   help="sirllm: sinks + highest-surprisal tokens (+ recent); "
                        "streaming: sinks + recent window (StreamingLLM); full: no eviction")
    g.add_argument("--start-size", type=int, default=None,
                   help="attention sinks kept at the front (default 4)")
    g.add_argument("--entropy-size", type=int, default=None,
                   help="sirllm: tokens kept by score (default: the task's budget minus 4)")
    g.add_argument("--recent-size", type=int, default=None,
                   help="most recent tokens kept (sirllm default 0; streaming default: budget minus 4)")
    g.add_argument("--decay", type=float, default=None,
                   help="sirllm: score decay per turn, in (0, 1] (default: the task's)")
    g.add_argument("--score", choices=SCORE_VARIANTS, default=None,
                   help="sirllm: 'paper' = -log p(token | prefix); 'reference-code' = the "
                        "released code's one-position-off variant (default paper)")


def policy_from_args(args: argparse.Namespace, budget: int = 1024, decay: float = 1.0) -> Policy:
    """Build the policy, filling unset knobs from the task's paper settings."""
    name = POLICY_ALIASES.get(args.policy, args.policy)
    start = 4 if args.start_size is None else args.start_size
    if name == "sirllm":
        recent = 0 if args.recent_size is None else args.recent_size
        entropy = budget - start - recent if args.entropy_size is None else args.entropy_size
        return make_policy("sirllm", start_size=start, entropy_size=entropy, recent_size=recent,
                           decay=decay if args.decay is None else args.decay,
                           score=args.score or "paper")
    if name == "streaming":
        _refuse(args, "entropy_size", "decay", "score", policy=name)
        recent = budget - start if args.recent_size is None else args.recent_size
        return make_policy("streaming", start_size=start, recent_size=recent)
    _refuse(args, "start_size", "entropy_size", "recent_size", "decay", "score", policy=name)
    return make_policy("full")


def _refuse(args, *knobs: str, policy: str) -> None:
    given = [k for k in knobs if getattr(args, k) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} do(es) not apply to --policy {policy}")
