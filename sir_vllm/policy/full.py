"""Full attention: the no-eviction baseline (stock vLLM behaviour)."""

from __future__ import annotations

import numpy as np

from .base import check_size
from .registry import register_policy


@register_policy
class FullPolicy:
    """Never evicts; the cache grows with the dialogue (upper bound on quality)."""

    name = "full"
    aliases = ("none",)
    summary = "no eviction (stock vLLM on the server)"
    bounded = False  # no session budget: the server refuses it for sessions
    knobs = ()
    cache_size = None
    decay = 1.0
    score = "paper"
    needs_scores = False

    def select(self, scores, num_coming: int) -> np.ndarray | None:
        check_size("num_coming", num_coming)
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "cache_size": None}

    def __repr__(self) -> str:
        return "FullPolicy()"
