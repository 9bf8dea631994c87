"""KV retention policies: SirLLM and its baselines (pure Python/NumPy).

    policy = make_policy("sirllm", entropy_size=508, decay=0.7)
    keep = policy.select(scores, num_coming)   # None: nothing to evict

Every policy class registers itself (`registry.register_policy`); the names,
aliases and knobs everyone offers come from `registry`.
"""

from __future__ import annotations

from .base import PART, REST, SCORE_VARIANTS, Knob, Policy
from .full import FullPolicy  # importing a policy's module registers its class
from .registry import (PolicyError, canonical_name, fit_budget, knob_users, knobs_of,
                       make_policy, policy_aliases, policy_class, policy_names,
                       register_policy, unregister_policy)
from .scores import SessionScores, turn_scores
from .sirllm import SirLLMPolicy
from .streaming import StreamingPolicy


def __getattr__(name: str):
    """POLICY_NAMES / POLICY_ALIASES: live views of the registry, for older imports."""
    if name == "POLICY_NAMES":
        return policy_names()
    if name == "POLICY_ALIASES":
        return policy_aliases()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PART",
    "REST",
    "SCORE_VARIANTS",
    "FullPolicy",
    "Knob",
    "Policy",
    "PolicyError",
    "SessionScores",
    "SirLLMPolicy",
    "StreamingPolicy",
    "canonical_name",
    "fit_budget",
    "knob_users",
    "knobs_of",
    "make_policy",
    "policy_aliases",
    "policy_class",
    "policy_names",
    "register_policy",
    "turn_scores",
    "unregister_policy",
]
