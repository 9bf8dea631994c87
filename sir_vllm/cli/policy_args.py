"""The policy flags shared by `eval` and `replay`, generated from the policy registry.

`--policy NAME` plus one `--<knob>` per knob any policy declares (e.g.
`--entropy-size`). Unset knobs take the task's paper settings: the budget's
REST knob (sirllm's entropy_size, streaming's recent window) takes the task's
budget minus the other sizes, and a `decay` knob the task's decay.
"""

from __future__ import annotations

import argparse

from ..policy import PolicyError, Policy, canonical_name, fit_budget, knob_users, knobs_of
from ..policy.base import REST
from ..policy.registry import argparse_help, describe_knob, describe_policies, names_with_aliases

TASK_DECAY_KNOB = "decay"  # the knob a task's paper decay fills when unset


def option_for(knob: str) -> str:
    return "--" + knob.replace("_", "-")


def _task_default(cls, knob) -> str | None:
    """The default in words where the task decides it."""
    if knob.budget == REST:
        return "the task's budget minus the other sizes"
    if knob.name == TASK_DECAY_KNOB:
        return "the task's"
    return None


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV policy")
    g.add_argument("--policy", required=True, choices=names_with_aliases(),
                   help=argparse_help(describe_policies() + "."))  # required: no default
    for name, users in knob_users().items():
        knob = users[0][1]
        g.add_argument(option_for(name), dest=name, type=knob.type, choices=knob.choices,
                       default=None, help=argparse_help(describe_knob(name, _task_default)))


def policy_from_args(args: argparse.Namespace, budget: int = 1024, decay: float = 1.0) -> Policy:
    """Build the policy, filling unset knobs from the task's paper settings."""
    name = canonical_name(args.policy)
    given = {k: getattr(args, k, None) for k in knob_users()}
    given = {k: v for k, v in given.items() if v is not None}
    own = {k.name for k in knobs_of(name)}
    _refuse(sorted(set(given) - own, key=list(knob_users()).index), policy=name)
    if TASK_DECAY_KNOB in own:
        given.setdefault(TASK_DECAY_KNOB, decay)
    try:
        return fit_budget(name, budget, **given)
    except PolicyError as e:
        raise ValueError(f"{option_for(e.knob)}: {e}" if e.knob in own else str(e)) from None


def _refuse(knobs: list[str], policy: str) -> None:
    if knobs:
        flags = ", ".join(option_for(k) for k in knobs)
        raise ValueError(f"{flags} do(es) not apply to --policy {policy}")
