"""`sir-vllm bench`: multi-session, multi-turn load against stock vLLM and the
session policies (see `client` for how each is driven and how TTFT is taken)."""

from .client import RESEND, SESSION, Conversation, TurnRecord, run_load
from .metrics import (first_failure, is_context_length_error, late_window, memory_report, ratios,
                      summarize)
from .runner import BenchConfig, Budget, parse_budget, parse_policies, parse_sessions, run_bench

__all__ = [
    "RESEND", "SESSION", "BenchConfig", "Budget", "Conversation", "TurnRecord", "first_failure",
    "is_context_length_error", "late_window", "memory_report", "parse_budget", "parse_policies",
    "parse_sessions", "ratios", "run_bench", "run_load", "summarize",
]
