"""`vllm serve --kv-policy ...`: the flags, their validation, and what they turn into.

The flags are validated with the policy module itself (`make_policy`), so a
value the policy would refuse stops start-up with a message naming the flag.
A policy other than `none` becomes this package's KV connector
(`kv_transfer_config`) plus the session middleware of the API server.
"""

from __future__ import annotations

import argparse
import os
import sys

from sir_vllm.policy import SCORE_VARIANTS, make_policy

POLICY_CHOICES = ("sirllm", "streaming", "none")
CONNECTOR_CLASS = "SirKVConnector"
CONNECTOR_MODULE = "sir_vllm.connector"
MIDDLEWARE = "sir_vllm.server.middleware.SessionMiddleware"

# flag -> (dest, policy knob, argparse type, help)
KNOB_FLAGS = {
    "--kv-start-size": ("kv_start_size", "start_size", int,
                        "Attention-sink tokens always kept (default 4)."),
    "--kv-entropy-size": ("kv_entropy_size", "entropy_size", int,
                          "Tokens kept by score, SirLLM only (default 1020)."),
    "--kv-recent-size": ("kv_recent_size", "recent_size", int,
                         "Most recent tokens kept (default 0 for sirllm, 1020 for streaming)."),
    "--kv-decay": ("kv_decay", "decay", float,
                   "Per-turn score decay in (0, 1], SirLLM only (default 1.0)."),
    "--kv-score": ("kv_score", "score", str,
                   "Token score: 'paper' (surprisal of each token) or 'reference-code' "
                   "(the released code's off-by-one variant), SirLLM only."),
}
KNOB_TO_FLAG = {knob: flag for flag, (_, knob, _, _) in KNOB_FLAGS.items()}


def add_kv_policy_args(parser) -> None:
    """Add the sir-vllm group to an engine-argument parser (idempotent)."""
    if any("--kv-policy" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group(
        "SirLLM",
        "sir-vllm session memory: keep each session's KV cache between requests (`session_id` body field or "
        "X-Session-ID header), cut back between turns by a retention policy.")
    group.add_argument("--kv-policy", choices=POLICY_CHOICES, default="none",
                       help="KV retention policy for sessions; 'none' is stock vLLM.")
    for flag, (dest, _, typ, text) in KNOB_FLAGS.items():
        kwargs = {"choices": SCORE_VARIANTS} if flag == "--kv-score" else {}
        group.add_argument(flag, dest=dest, type=typ, default=None, help=text, **kwargs)


def knobs_from_args(args) -> dict:
    return {knob: getattr(args, dest, None) for dest, knob, _, _ in KNOB_FLAGS.values()}


class FlagError(ValueError):
    pass


def _flag_for(message: str) -> str:
    """The flag whose knob the policy's message names first."""
    hits = [(message.find(knob), flag) for knob, flag in KNOB_TO_FLAG.items() if knob in message]
    return min(hits)[1] if hits else "--kv-policy"


def policy_from_args(args):
    """The validated policy, or None for `--kv-policy none`; raises FlagError."""
    name = getattr(args, "kv_policy", "none") or "none"
    knobs = {k: v for k, v in knobs_from_args(args).items() if v is not None}
    if name == "none":
        if knobs:
            flags = ", ".join(KNOB_TO_FLAG[k] for k in knobs)
            raise FlagError(f"{flags}: needs --kv-policy sirllm or streaming")
        return None
    try:
        policy = make_policy(name, **knobs)
    except ValueError as e:
        raise FlagError(f"{_flag_for(str(e))}: {e}") from None
    if getattr(policy, "score", "paper") != "paper" and policy.needs_scores:
        # The released code scores token j with the logit row at j itself (not
        # the row before it). vLLM 0.32 returns an arbitrary token's log-prob per
        # prompt row only through `prompt_logprob_token_ids`, which its V1 model
        # runners (the CPU one included) refuse; prompt_logprobs=-1 would ship the
        # whole vocabulary per token. So the server offers the paper's score only.
        raise FlagError("--kv-score: 'reference-code' (the released code's one-position shift) "
                        "needs each prompt row's log-prob of its own token, which vLLM 0.32 "
                        "gives only on its V2 model runner (prompt_logprob_token_ids); "
                        "use 'paper', or the oracle (`sir-vllm eval --backend reference`)")
    return policy


def check_serving(args) -> None:
    """What a session store in the API process cannot support."""
    count = getattr(args, "api_server_count", None)
    if count is not None and count > 1:
        raise FlagError(f"--api-server-count {count}: --kv-policy keeps each session in the one "
                        "API server process; run with --api-server-count 1")
    if getattr(args, "kv_transfer_config", None) is not None:
        raise FlagError("--kv-transfer-config: --kv-policy installs its own KV connector; "
                        "drop one of the two")


def kv_transfer_config(policy) -> dict:
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"policy": policy.to_dict()},
    }


def apply_kv_policy_args(args) -> None:
    """Turn parsed flags into the engine's kv_transfer_config and the server's
    session middleware; exit like argparse on a bad value."""
    if getattr(args, "_sir_vllm_applied", False):
        return
    try:
        policy = policy_from_args(args)
        if policy is None:
            return
        check_serving(args)
        _check_patches()
    except FlagError as e:
        print(f"vllm serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from sir_vllm import vllm_adapter

    args.kv_transfer_config = vllm_adapter.kv_transfer_config(kv_transfer_config(policy))
    vllm_adapter.keep_stock_cpu_reservation(args, os.environ)  # inherited by the engine processes
    if hasattr(args, "middleware"):
        args.middleware = [*(args.middleware or []), MIDDLEWARE]
    from sir_vllm.server import settings

    settings.configure(policy=policy, args=args)
    args._sir_vllm_applied = True


def _check_patches() -> None:
    from sir_vllm.setup.patches import PATCH_DIR, site_packages, status

    for patch in sorted(PATCH_DIR.glob("*.patch")):
        st = status(patch, site_packages())
        if st.state != "already-applied":
            raise FlagError(f"--kv-policy: vLLM patch {patch.name} is {st.state}; "
                            "run `sir-vllm patches apply` first")


def parser_for_tests() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_kv_policy_args(p)
    return p
