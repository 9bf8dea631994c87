"""`vllm serve --kv-policy ...`: the flags, their validation, and what they turn into.

Every flag is generated: `--kv-policy` and one `--kv-<knob>` per knob from
the policy registry (`sir_vllm.policy.registry`), one flag per session
setting from `settings.Settings`. Values are validated with the policy module
itself (`make_policy`), so a value the policy would refuse stops start-up with
a message naming the flag. A policy other than `none` becomes this package's
KV connector (`kv_transfer_config`) plus the session middleware of the API
server. `policy_from_request` applies the same rules, and the operator's
limits, to a request's `kv_policy` body field.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from sir_vllm import vllm_adapter
from sir_vllm.connector import admission, offload
from sir_vllm.policy import Policy, PolicyError, knob_users, make_policy, policy_class, policy_names
from sir_vllm.policy.registry import (argparse_help, budget_knobs, describe_knob,
                                      describe_policies, knob_values, names_with_aliases)
from sir_vllm.server import settings

NONE = "none"  # --kv-policy none: stock vLLM
CONNECTOR_CLASS = "SirKVConnector"
CONNECTOR_MODULE = "sir_vllm.connector"
MIDDLEWARE = "sir_vllm.server.middleware.SessionMiddleware"
GROUP = "SirLLM"  # `vllm serve --help=SirLLM`

# The released code scores token j with the logit row at j itself (not the row
# before it). vLLM 0.32 returns an arbitrary token's log-prob per prompt row
# only through `prompt_logprob_token_ids`, which its V1 model runners (the CPU
# one included) refuse; prompt_logprobs=-1 would ship the whole vocabulary per
# token. So the server offers the paper's score only.
SERVER_SCORE = "paper"
SCORE_REFUSAL = ("'reference-code' (the released code's one-position shift) needs each prompt "
                 "row's log-prob of its own token, which vLLM 0.32 gives only on its V2 model "
                 "runner (prompt_logprob_token_ids); use 'paper', or the oracle "
                 "(`sir-vllm eval --backend reference`)")


class FlagError(ValueError):
    pass


def knob_flag(knob: str) -> str:
    return "--kv-" + knob.replace("_", "-")


def knob_dest(knob: str) -> str:
    return "kv_" + knob


def setting_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def policy_choices() -> tuple[str, ...]:
    """What `--kv-policy` takes: every bounded policy (and its aliases), and none."""
    return (*names_with_aliases(bounded=True), NONE)


# -- the argument group ---------------------------------------------------------

def add_kv_policy_args(parser) -> None:
    """Add the SirLLM group to an engine-argument parser (idempotent)."""
    if vllm_adapter.has_option(parser, "--kv-policy"):
        return
    group = parser.add_argument_group(
        GROUP,
        "sir-vllm session memory: keep each session's KV cache between requests (`session_id` body field or "
        "X-Session-ID header), cut back between turns by a retention policy.")
    group.add_argument("--kv-policy", choices=policy_choices(), default=NONE,
                       help=(f"KV retention policy for sessions. {describe_policies(bounded=True)}; "
                             f"{NONE}: stock vLLM, no sessions.").replace("%", "%%"))
    for name, users in knob_users(bounded=True).items():
        knob = users[0][1]
        group.add_argument(knob_flag(name), dest=knob_dest(name), type=knob.type,
                           choices=knob.choices, default=None,
                           help=argparse_help(describe_knob(name, bounded=True)))
    for _, default, spec in settings.session_settings():
        text = spec.default_text or default
        group.add_argument(spec.flag, dest=setting_dest(spec.flag), type=spec.type,
                           choices=spec.choices, metavar=spec.metavar, default=None,
                           help=argparse_help(f"{spec.help.rstrip('.')} (default: {text})."))


def parser_for_tests() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_kv_policy_args(p)
    return p


# -- from parsed flags to the server's policy and settings ------------------------

def knobs_from_args(args) -> dict:
    """The knob flags given (not None), by knob name."""
    values = {k: getattr(args, knob_dest(k), None) for k in knob_users(bounded=True)}
    return {k: v for k, v in values.items() if v is not None}


def _settings_given(args) -> dict:
    """The session-setting flags given (not None), by settings field."""
    values = {name: getattr(args, setting_dest(spec.flag), None)
              for name, _, spec in settings.session_settings()}
    return {k: v for k, v in values.items() if v is not None}


def _flags_of_settings(names) -> list[str]:
    return [spec.flag for name, _, spec in settings.session_settings() if name in names]


def policy_from_args(args):
    """The validated policy, or None for `--kv-policy none`; raises FlagError."""
    name = getattr(args, "kv_policy", NONE) or NONE
    knobs = knobs_from_args(args)
    if name == NONE:
        given = [knob_flag(k) for k in knobs] + _flags_of_settings(_settings_given(args))
        if given:
            raise FlagError(f"{', '.join(given)}: needs --kv-policy "
                            f"{' or '.join(policy_names(bounded=True))}")
        return None
    try:
        cls = policy_class(name)
    except PolicyError as e:
        raise FlagError(f"--kv-policy: {e}") from None
    if not cls.bounded:
        raise FlagError(f"--kv-policy {name}: never evicts, so it cannot bound a session; "
                        f"use '{NONE}' for stock vLLM")
    own = [k.name for k in cls.knobs]
    foreign = [k for k in knobs if k not in own]
    if foreign:
        raise FlagError(f"{', '.join(map(knob_flag, foreign))}: not a knob of --kv-policy "
                        f"{cls.name} (its knobs: {', '.join(map(knob_flag, own)) or 'none'})")
    try:
        policy = make_policy(cls.name, **knobs)
    except PolicyError as e:
        raise FlagError(f"{knob_flag(e.knob) if e.knob in own else '--kv-policy'}: {e}") from None
    if _scores_unservable(policy):
        raise FlagError(f"--kv-score: {SCORE_REFUSAL}")
    return policy


def _scores_unservable(policy: Policy) -> bool:
    return bool(policy.needs_scores) and getattr(policy, "score", SERVER_SCORE) != SERVER_SCORE


def session_settings_from_args(args, policy: Policy) -> dict:
    """The session settings given on the command line, validated; raises FlagError.
    Settings not given are left out (`settings.configure` applies their defaults)."""
    given = _settings_given(args)
    for name, _, spec in settings.session_settings():
        if name not in given:
            continue
        value = given[name]
        if spec.minimum is not None and (not math.isfinite(value) or value < spec.minimum):
            kind = "an integer" if spec.type is int else "a number"
            raise FlagError(f"{spec.flag}: must be {kind} >= {spec.minimum}, got {value}")
        if spec.choices is not None and value not in spec.choices:
            raise FlagError(f"{spec.flag}: must be one of {', '.join(map(str, spec.choices))}, "
                            f"got {value!r}")
    if "session_store" in given:
        from sir_vllm.sessions.store import store_kind

        try:
            store_kind(given["session_store"])
        except ValueError as e:
            raise FlagError(f"--kv-session-store: {e}") from None
    limit = given.get("max_budget")
    if limit is not None and policy.cache_size is not None and limit < policy.cache_size:
        sizes = " + ".join(knob_flag(k) for k in budget_knobs(policy.name))
        raise FlagError(f"--kv-max-budget {limit}: below the server's own budget of "
                        f"{policy.cache_size} tokens ({sizes})")
    return given


def chat_template_from_args(args) -> str | None:
    """`--chat-template`, loaded as vLLM loads it; raises FlagError."""
    try:
        return vllm_adapter.load_chat_template(getattr(args, "chat_template", None))
    except ValueError as e:
        raise FlagError(f"--chat-template: {e}") from None


def check_serving(args) -> None:
    """What the session store chosen cannot support."""
    from sir_vllm.sessions.store import store_kind

    count = getattr(args, "api_server_count", None)
    store = getattr(args, setting_dest("--kv-session-store"), None)
    if count is not None and count > 1 and store_kind(store) == "memory":
        raise FlagError(f"--api-server-count {count}: --kv-session-store memory keeps each session "
                        "in one API server process; use sqlite (the default) or redis:// to share "
                        "sessions between them")
    if getattr(args, "kv_transfer_config", None) is not None:
        raise FlagError("--kv-transfer-config: --kv-policy installs its own KV connector; "
                        "drop one of the two")


def kv_transfer_config(policy, max_running: int | str = 0, offload_bytes: int = 0) -> dict:
    """The engine's connector, with what its scheduler role needs to know."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"policy": policy.to_dict(),
                                      admission.CONFIG_KEY: max_running,
                                      offload.CONFIG_KEY: offload_bytes},
    }


def serve_args(policy: Policy) -> list[str]:
    """`vllm serve` arguments that give this policy: `--kv-policy NAME --kv-<knob> V ...`."""
    args = ["--kv-policy", policy.name]
    for knob, value in knob_values(policy).items():
        args += [knob_flag(knob), str(value)]
    return args


def configure_from_args(args):
    """Fill `settings.current` from parsed flags; returns the policy (None for
    `--kv-policy none`); raises FlagError. Every process that serves sessions
    runs this on the same arguments: the one that parsed the command line, and
    each API server process vLLM spawns (`--api-server-count`), which inherits
    the arguments but not this module's state."""
    policy = policy_from_args(args)
    if policy is None:
        return None
    session = session_settings_from_args(args, policy)
    template = chat_template_from_args(args)
    settings.configure(policy, args, chat_template=template, **session)
    return policy


def apply_kv_policy_args(args) -> None:
    """Turn parsed flags into the engine's kv_transfer_config, the server's
    session middleware and settings; exit like argparse on a bad value."""
    if getattr(args, "_sir_vllm_applied", False):
        return
    try:
        policy = configure_from_args(args)
        if policy is None:
            return
        check_serving(args)
        _check_patches()
    except FlagError as e:
        print(f"vllm serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.kv_transfer_config = vllm_adapter.kv_transfer_config(
        kv_transfer_config(policy, settings.current.max_running, settings.current.offload_bytes))
    vllm_adapter.keep_stock_cpu_reservation(args, os.environ)  # inherited by the engine processes
    vllm_adapter.add_middleware(args, MIDDLEWARE)
    args._sir_vllm_applied = True


def _check_patches() -> None:
    from sir_vllm.setup.patches import PATCH_DIR, site_packages, status

    for patch in sorted(PATCH_DIR.glob("*.patch")):
        st = status(patch, site_packages())
        if st.state != "already-applied":
            raise FlagError(f"--kv-policy: vLLM patch {patch.name} is {st.state}; "
                            "run `sir-vllm patches apply` first")


# -- a request's kv_policy --------------------------------------------------------

EXAMPLE = '{"name": "sirllm", "entropy_size": 64}'


def policy_from_request(value, default_policy: Policy, max_budget: int | None) -> Policy:
    """The session policy a request's `kv_policy` body field asks for.

    `value` is the field as decoded from JSON: None (absent) gives
    `default_policy`; an object names a policy (`name`, default: the server's)
    and its knobs, unset knobs taking the policy's defaults. `max_budget` is
    the operator's limit on its cache_size (`settings.current.budget_limit()`;
    None: the default policy's own budget). Raises ValueError with a message
    for an HTTP 400: not an object, unknown or unbounded policy, unknown knob,
    bad value, a score the server cannot compute, a budget above the limit.
    """
    if value is None:
        return default_policy
    if not isinstance(value, dict):
        raise ValueError(f"kv_policy must be an object like {EXAMPLE}, got {type(value).__name__}")
    knobs = dict(value)
    name = knobs.pop("name", default_policy.name)
    session_names = ", ".join(policy_names(bounded=True))
    try:
        cls = policy_class(name) if isinstance(name, str) else None
    except PolicyError:
        cls = None
    if cls is None:
        raise ValueError(f"kv_policy.name: unknown policy {name!r}; a session takes one of "
                         f"{session_names}")
    if not cls.bounded:
        raise ValueError(f"kv_policy.name: {name!r} never evicts; a session needs a bounded "
                         f"policy ({session_names})")
    own = [k.name for k in cls.knobs]
    unknown = [k for k in knobs if k not in own and k != "cache_size"]
    if unknown:
        raise ValueError(f"kv_policy.{unknown[0]}: not a knob of policy {cls.name!r} "
                         f"(its knobs: {', '.join(own) or 'none'})")
    try:
        policy = make_policy(cls.name, **knobs)
    except PolicyError as e:
        raise ValueError(f"kv_policy.{e.knob}: {e}" if e.knob else f"kv_policy: {e}") from None
    if _scores_unservable(policy):
        raise ValueError(f"kv_policy.score: {SCORE_REFUSAL}")
    limit = default_policy.cache_size if max_budget is None else max_budget
    if limit is not None and policy.cache_size is not None and policy.cache_size > limit:
        sizes = " + ".join(budget_knobs(cls.name))
        raise ValueError(f"kv_policy: budget of {policy.cache_size} tokens ({sizes}) is above "
                         f"this server's limit of {limit} (--kv-max-budget)")
    return policy
