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
    kv_bytes_per_token: int | None = None  # K and V of every layer, in the served dtype


current = Settings()


def configure(policy, args) -> None:
    current.policy = policy
    current.tokenizer = getattr(args, "tokenizer", None) or getattr(args, "model", None)
    current.api_keys = tuple(k for k in (getattr(args, "api_key", None) or []) if k)
    current.kv_bytes_per_token = kv_bytes_per_token(getattr(args, "model", None),
                                                    getattr(args, "dtype", "auto"))


_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


def kv_bytes_per_token(model: str | None, dtype: str | None) -> int | None:
    """What one cached token costs: 2 (K, V) x layers x KV heads x head size x
    dtype bytes, from the model's config (None when it cannot be read)."""
    if not model:
        return None
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model)
    except Exception:  # a remote name without a hub, a config transformers lacks
        return None
    c = getattr(c, "text_config", c)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    name = str(dtype or "auto").removeprefix("torch.")
    if name == "auto":
        name = str(getattr(c, "dtype", None) or getattr(c, "torch_dtype", None) or "float16")
        name = name.removeprefix("torch.")
    return 2 * c.num_hidden_layers * heads * head_dim * _DTYPE_BYTES.get(name, 2)
