"""How a turn too long for the budget is split into passes (shared by the oracle and the server).

A turn is fed whole when it fits: a later turn when its new tokens plus its
answer leave the sinks room in the budget (the policy's own check); a first
turn when it fits the model's window (nothing is cached before it, as in the
reference code, and the next turn's eviction brings the session back under
the budget). Otherwise it runs as passes of at most `chunk` tokens each:

    input pieces    the turn's input (the pending token, then the new tokens)
                    cut into pieces of `chunk` tokens; each but the last is a
                    prefill pass (max_tokens 0)
    answer segments the last piece is fed with the first answer segment, then
                    each further segment starts from the pending token; at
                    most `chunk` tokens each, until max_tokens or a stop

Every pass evicts before it as the policy says, so the cache never holds more
than the budget; decay applies once per turn (at its first pass), never per
pass; each pass's first token gets that pass's highest score, as each turn's
first token does. Positions are the compacted cache's, as for any turn.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TurnSplit:
    pieces: list[int]  # sizes of the input pieces, over pending + new tokens
    segments: list[int]  # sizes (max_tokens) of the answer segments; [] for a prefill turn

    @property
    def passes(self) -> int:
        return len(self.pieces) + max(len(self.segments) - 1, 0)


def default_chunk(policy) -> int:
    """A quarter of the room beside the sinks: each pass keeps most of the memory."""
    return max(1, (policy.cache_size - policy.start_size) // 4)


def max_chunk(policy) -> int:
    """A last piece plus a first segment (2 x chunk) must fit beside the sinks."""
    return max(1, (policy.cache_size - policy.start_size) // 2)


def fits_whole(policy, first_turn: bool, num_coming: int, sequence: int,
               window: int | None) -> bool:
    """Whether a turn runs as one pass (see the module doc). `num_coming`: what
    the policy reserves for the turn (new tokens + answer); `sequence`: the
    tokens the engine would hold at its end (prompt + answer)."""
    if first_turn:
        return window is None or sequence <= window
    return num_coming <= policy.cache_size - policy.start_size


def split_turn(num_inputs: int, max_tokens: int, chunk: int) -> TurnSplit:
    """Pieces over the turn's `num_inputs` input tokens (pending included) and
    the answer's segments, each at most `chunk` tokens."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if num_inputs < 1:
        raise ValueError("a turn needs at least one input token")
    pieces = [chunk] * ((num_inputs - 1) // chunk) + [num_inputs - chunk * ((num_inputs - 1) // chunk)]
    segments = []
    left = max_tokens
    while left > 0:
        segments.append(min(chunk, left))
        left -= segments[-1]
    return TurnSplit(pieces, segments)
