"""StreamingLLM: attention sinks plus a sliding window of recent tokens."""

from __future__ import annotations

import numpy as np

from .base import PART, REST, Knob, as_scores, check_size, needs_eviction
from .registry import register_policy


@register_policy
class StreamingPolicy:
    """The StreamingLLM baseline (released `evict_for_space`).

    Keeps tokens 0..start_size-1 (attention sinks) and the last
    cache_size - num_coming - start_size tokens. Scores are ignored; only their
    count is used. start_size=0 gives a plain sliding window.
    """

    name = "streaming"
    summary = "the sinks and a window of the most recent tokens (StreamingLLM)"
    bounded = True
    knobs = (
        Knob("start_size", int, 4, "Attention-sink tokens always kept at the front", budget=PART),
        Knob("recent_size", int, 1020, "Most recent tokens kept", budget=REST),
    )
    decay = 1.0
    score = "paper"
    needs_scores = False

    def __init__(self, start_size: int = 4, recent_size: int = 1020):
        self.start_size = check_size("start_size", start_size)
        self.recent_size = check_size("recent_size", recent_size)
        self.cache_size = self.start_size + self.recent_size
        if self.cache_size <= 0:
            raise ValueError("start_size + recent_size must be > 0, got 0")

    def select(self, scores, num_coming: int) -> np.ndarray | None:
        n = len(as_scores(scores))
        if not needs_eviction(n, num_coming, self.cache_size, self.start_size):
            return None
        window = self.cache_size - num_coming - self.start_size
        # n > cache_size - num_coming, so the window never overlaps the sinks.
        sinks = np.arange(min(self.start_size, n), dtype=np.int64)
        recent = np.arange(n - window, n, dtype=np.int64)
        return np.concatenate([sinks, recent])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "start_size": self.start_size,
            "recent_size": self.recent_size,
            "cache_size": self.cache_size,
        }

    def __repr__(self) -> str:
        return f"StreamingPolicy(start_size={self.start_size}, recent_size={self.recent_size})"
