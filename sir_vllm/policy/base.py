"""The policy protocol and the checks every policy shares.

A policy only decides *which* cached tokens survive a turn; it never touches
tensors. The PyTorch oracle and the vLLM connector both call it, so the parity
test between them exercises the KV mechanism rather than two copies of the rule.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

SCORE_VARIANTS = ("paper", "reference-code")

# Knob.budget roles: how a knob counts toward cache_size.
PART = "part"  # its tokens are part of the budget
REST = "rest"  # takes whatever a total budget leaves after the parts


@dataclass(frozen=True)
class Knob:
    """One tunable of a policy, declared once on the policy class.

    The server's `--kv-*` flags, the CLI's knob arguments and the checks on a
    request's `kv_policy` are all generated from these declarations.
    """

    name: str  # the constructor's keyword and the `to_dict` key
    type: type  # int, float or str: what a command-line string is parsed as
    default: object  # the constructor's default (the registry checks they agree)
    help: str  # one line, without the default (front ends add it)
    choices: tuple | None = None
    budget: str | None = None  # PART, REST or None (not a token count)


@runtime_checkable
class Policy(Protocol):
    name: str  # "sirllm" | "streaming" | "full"
    bounded: bool  # keeps a session within cache_size (False for full)
    knobs: tuple[Knob, ...]  # what a caller may set (class attribute)
    cache_size: int | None  # token budget; None for full
    decay: float  # 1.0 for streaming/full
    score: str  # "paper" | "reference-code" (ignored by non-sirllm)
    needs_scores: bool  # True only for sirllm

    def select(self, scores: np.ndarray, num_coming: int) -> np.ndarray | None:
        """Indices (int64, ascending) of cached tokens to keep before a turn of
        num_coming tokens, or None when nothing is evicted (cached + num_coming <= cache_size)."""
        ...

    def to_dict(self) -> dict:
        """Knobs, for JSON result files."""
        ...


def check_size(knob: str, value) -> int:
    """A token count: an int >= 0 (bools and floats refused, so typos surface)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{knob} must be an integer >= 0, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{knob} must be an integer >= 0, got {value}")
    return value


def check_decay(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"decay must be in (0, 1], got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"decay must be in (0, 1], got {value}")
    return value


def check_score(value) -> str:
    if value not in SCORE_VARIANTS:
        raise ValueError(f"score must be one of {', '.join(SCORE_VARIANTS)}, got {value!r}")
    return value


def as_scores(scores) -> np.ndarray:
    """The cached tokens' scores as a 1-D float64 array."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
    return arr


def needs_eviction(n: int, num_coming: int, cache_size: int, start_size: int) -> bool:
    """False when the turn fits as is; raises when it cannot fit even after eviction.

    After eviction the cache holds cache_size - num_coming tokens, and the sinks
    are always among them, so a turn leaving less room than start_size cannot be
    served (callers turn this ValueError into an HTTP 400).
    """
    num_coming = check_size("num_coming", num_coming)
    if n + num_coming <= cache_size:
        return False
    if cache_size - num_coming < start_size:
        raise ValueError(
            f"turn of {num_coming} tokens does not fit budget {cache_size}"
            f" (start_size={start_size})"
        )
    return True
