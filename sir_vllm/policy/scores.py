"""Per-token scores of a turn, and the per-session score bookkeeping.

Both the oracle and the vLLM connector keep one score per cached token, cut it
back with the policy's keep set, and decay it between turns; SessionScores is
that shared bookkeeping, so the two paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import SCORE_VARIANTS, Policy


def turn_scores(variant: str, surprisal) -> np.ndarray:
    """Scores (float64, length n) of one turn's input tokens x_0..x_{n-1}.

    "paper": surprisal[j] = -log p(x_j | x_<j) for j >= 1 (surprisal[0] is
    ignored, may be NaN: x_0 has no logit inside the turn's pass); x_0 gets the
    turn's maximum, so the turn boundary is kept preferentially.

    "reference-code": the released `_cal_selfinfo`, surprisal[i] =
    -log softmax(logits[i])[x_i] (one position off). Result is
    [max(surprisal)] + surprisal[:-1]; the max is taken before the shift, so it
    includes the last value that the shift drops.
    """
    if variant not in SCORE_VARIANTS:
        raise ValueError(f"score must be one of {', '.join(SCORE_VARIANTS)}, got {variant!r}")
    s = np.array(surprisal, dtype=np.float64).reshape(-1)
    if len(s) == 0:
        raise ValueError("a turn needs at least one token, got 0 surprisal values")
    if variant == "paper":
        s[0] = s[1:].max() if len(s) > 1 else 0.0
        return s
    return np.concatenate([[s.max()], s[:-1]])


@dataclass
class SessionScores:
    """One score per cached token of a session, and how many turns it has seen."""

    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    turns: int = 0

    @property
    def size(self) -> int:
        return len(self.scores)

    def before_turn(self, policy: Policy, num_coming: int,
                    continues_turn: bool = False) -> np.ndarray | None:
        """Evict (if needed) and decay before a turn; returns the keep indices or None.

        Nothing happens on the first turn. From the second on, decay applies
        every turn, even when nothing was evicted (as the released code does).
        A pass that continues a turn (a long turn's next chunk or answer
        segment: `sir_vllm.policy.chunks`) evicts when it must, even within
        the first turn, and never decays: decay counts turns, not passes.
        """
        if self.turns == 0 and not continues_turn:
            return None
        keep = policy.select(self.scores, num_coming)
        if keep is not None:
            self.scores = self.scores[keep]
        if not continues_turn:
            self.scores = self.scores * policy.decay
        return keep

    def after_turn(self, new_scores, continues_turn: bool = False) -> None:
        """Append the scores of the tokens this turn (or pass) added to the cache."""
        new = np.asarray(new_scores, dtype=np.float64).reshape(-1)
        self.scores = np.concatenate([np.asarray(self.scores, dtype=np.float64), new])
        if not continues_turn:
            self.turns += 1
