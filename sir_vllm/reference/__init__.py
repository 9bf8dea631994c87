"""The oracle: SirLLM in plain PyTorch, independent of vLLM's code path."""

from .llama import KVCache, Llama
from .session import ReferenceSession, TurnResult

__all__ = ["KVCache", "Llama", "ReferenceSession", "TurnResult"]
