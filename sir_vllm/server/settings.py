"""The server-wide session settings, set once at start-up in the API process.

`vllm serve` builds its ASGI middleware by import path with no arguments, so
the flags hand the policy and the model's tokenizer path over through here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    policy: object = None  # the server's default Policy
    tokenizer: str | None = None  # path or name, as vLLM loads it
    api_keys: tuple[str, ...] = ()


current = Settings()


def configure(policy, args) -> None:
    current.policy = policy
    current.tokenizer = getattr(args, "tokenizer", None) or getattr(args, "model", None)
    current.api_keys = tuple(k for k in (getattr(args, "api_key", None) or []) if k)
