"""KV retention policies: SirLLM and its baselines (pure Python/NumPy).

    policy = make_policy("sirllm", entropy_size=508, decay=0.7)
    keep = policy.select(scores, num_coming)   # None: nothing to evict
"""

from __future__ import annotations

from .base import SCORE_VARIANTS, Policy
from .full import FullPolicy
from .scores import SessionScores, turn_scores
from .sirllm import SirLLMPolicy
from .streaming import StreamingPolicy

POLICY_NAMES = ("sirllm", "streaming", "full")
POLICY_ALIASES = {"none": "full"}

_CLASSES = {"sirllm": SirLLMPolicy, "streaming": StreamingPolicy, "full": FullPolicy}
_KNOBS = {
    "sirllm": ("start_size", "entropy_size", "recent_size", "decay", "score"),
    "streaming": ("start_size", "recent_size"),
    "full": (),
}


def make_policy(name: str, **knobs) -> Policy:
    """Build a policy by name; knobs set to None are ignored (unset CLI flags).

    A `cache_size` knob (as written by `to_dict`) is accepted when it matches
    the budget the other knobs give, so `make_policy(**p.to_dict())` round-trips.
    """
    key = POLICY_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in _CLASSES:
        names = ", ".join(POLICY_NAMES + tuple(POLICY_ALIASES))
        raise ValueError(f"unknown policy {name!r}; choose one of {names}")
    knobs = {k: v for k, v in knobs.items() if v is not None}
    cache_size = knobs.pop("cache_size", None)
    unknown = sorted(set(knobs) - set(_KNOBS[key]))
    if unknown:
        allowed = ", ".join(_KNOBS[key]) or "none"
        raise ValueError(
            f"unknown knob(s) for policy {key!r}: {', '.join(unknown)} (allowed: {allowed})"
        )
    policy = _CLASSES[key](**knobs)
    if cache_size is not None and cache_size != policy.cache_size:
        raise ValueError(
            f"cache_size {cache_size} does not match the knobs of policy {key!r}"
            f" (they give {policy.cache_size})"
        )
    return policy


__all__ = [
    "POLICY_ALIASES",
    "POLICY_NAMES",
    "SCORE_VARIANTS",
    "FullPolicy",
    "Policy",
    "SessionScores",
    "SirLLMPolicy",
    "StreamingPolicy",
    "make_policy",
    "turn_scores",
]
