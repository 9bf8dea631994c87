"""How a choice is picked from candidate log-probabilities.

`letter`: the paper's rule, the log-probability of the answer's first token
(the choice letter). `text`: the length-normalised log-likelihood of the
choice's text (lm-eval's acc_norm: summed log-prob over the text's tokens,
divided by its length in bytes). A 135M model answers letters at chance, so
`text` is the mode that can tell policies apart on this model.
"""

from __future__ import annotations

import numpy as np

SCORING_MODES = ("letter", "text")


def candidates(turn, mode: str) -> list[str]:
    if mode not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {', '.join(SCORING_MODES)}, got {mode!r}")
    return turn.letters if mode == "letter" else turn.texts


def values(mode: str, texts: list[str], text_lengths: list[int],
           logprobs: list[list[float]]) -> list[float]:
    """The per-candidate values `pick` compares (kept in the predictions, so
    two runs' picks can be compared margin by margin).

    text_lengths[i]: how many leading tokens of candidate i are its text (the
    rest is the template's end-of-message, which is fed but not scored).
    """
    if mode == "letter":
        return [float(lp[0]) for lp in logprobs]
    return [float(sum(lp[:n]) / max(1, len(t.encode("utf-8"))))
            for t, n, lp in zip(texts, text_lengths, logprobs)]


def pick(mode: str, texts: list[str], text_lengths: list[int], logprobs: list[list[float]]) -> int:
    """Index of the chosen candidate; ties go to the earlier one."""
    return int(np.argmax(values(mode, texts, text_lengths, logprobs)))


def margin(scores: list[float] | None) -> float | None:
    """Best minus second-best value: how close a pick was to flipping."""
    if not scores or len(scores) < 2:
        return None
    top = sorted(scores, reverse=True)
    return float(top[0] - top[1])
