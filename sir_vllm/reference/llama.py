"""A Llama forward you can read in one sitting, with a cache of *pre-RoPE* keys.

This is the oracle's model, independent of vLLM's code path: it caches keys
before RoPE and rotates every cached key by its index in the cache at every
forward (as the SirLLM and StreamingLLM reference code do), so a compacted
cache needs no re-rotation at all. The vLLM path stores keys after RoPE and
re-rotates by a position delta; the two mechanisms can disagree, which is what
makes the parity test worth having.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_dir(cls, path: Path) -> "LlamaConfig":
        c = json.loads((Path(path) / "config.json").read_text())
        rope = c.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or c.get("rope_scaling"):
            raise ValueError("the reference model supports plain (unscaled) RoPE only")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


@dataclass
class KVCache:
    """Per layer: pre-RoPE keys and values, each [kv_heads, N, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return self.keys[0].shape[1]

    def select(self, keep: torch.Tensor) -> "KVCache":
        """The cache cut back to the token indices in `keep` (kept in order)."""
        return KVCache([k[:, keep] for k in self.keys], [v[:, keep] for v in self.values])

    def extend(self, new: "KVCache") -> "KVCache":
        return KVCache(
            [torch.cat([a, b], dim=1) for a, b in zip(self.keys, new.keys)],
            [torch.cat([a, b], dim=1) for a, b in zip(self.values, new.values)],
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_table(n: int, d: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, d/2] for positions 0..n-1 (angles in float32, as HF and vLLM)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation of x [..., T, D] by per-position cos/sin [T, D/2]."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding of x [..., T, D] at integer positions [T]."""
    cos, sin = rope_table(int(positions.max()) + 1, x.shape[-1], theta, x.dtype)
    return apply_rope(x, cos[positions], sin[positions])


class Llama:
    """Weights as plain tensors; `forward` is the whole model."""

    def __init__(self, path: Path | str, dtype: torch.dtype = torch.float32):
        """float32 is what evaluation runs in; float64 shows the math is exact
        (fp32 results shift by ~1e-4 with the chunking alone)."""
        from safetensors.torch import load_file

        self.path = Path(path)
        self.config = LlamaConfig.from_dir(self.path)
        w = {}
        for f in sorted(self.path.glob("*.safetensors")):
            w.update(load_file(f))
        self.dtype = dtype
        self.w = {k.removeprefix("model."): v.to(dtype) for k, v in w.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["embed_tokens.weight"]

    def empty_cache(self) -> KVCache:
        c = self.config
        shape = (c.num_key_value_heads, 0, c.head_dim)
        zeros = [torch.zeros(shape, dtype=self.dtype) for _ in range(2 * c.num_hidden_layers)]
        return KVCache(zeros[: c.num_hidden_layers], zeros[c.num_hidden_layers:])

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Logits [B, T, vocab] of `ids` [B, T] continuing `cache` (shared by
        all B rows), and the new tokens' pre-RoPE K/V [B, kv_heads, T, D].

        A cached token's position is its index in the cache; new tokens
        continue at len(cache). Rows may be right-padded: a row's outputs at
        real positions never see its padding (causal mask).
        """
        c, w = self.config, self.w
        B, T = ids.shape
        N = len(cache)
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        cos, sin = rope_table(N + T, D, c.rope_theta, self.dtype)
        # New tokens see the whole cache and, causally, each other.
        mask = torch.ones(T, N + T, dtype=torch.bool).tril(diagonal=N)
        x = w["embed_tokens.weight"][ids]
        new_k, new_v = [], []
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
            q = F.linear(h, w[p + "self_attn.q_proj.weight"]).view(B, T, H, D).transpose(1, 2)
            k = F.linear(h, w[p + "self_attn.k_proj.weight"]).view(B, T, Hkv, D).transpose(1, 2)
            v = F.linear(h, w[p + "self_attn.v_proj.weight"]).view(B, T, Hkv, D).transpose(1, 2)
            new_k.append(k)
            new_v.append(v)
            # Every cached key is rotated by its index in the cache, every step.
            cached = apply_rope(cache.keys[i], cos[:N], sin[:N]).expand(B, -1, -1, -1)
            keys = torch.cat([cached, apply_rope(k, cos[N:], sin[N:])], dim=2)
            vals = torch.cat([cache.values[i].expand(B, -1, -1, -1), v], dim=2)
            q = apply_rope(q, cos[N:], sin[N:])
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask,
                                                 scale=1.0 / math.sqrt(D), enable_gqa=H != Hkv)
            x = x + F.linear(att.transpose(1, 2).reshape(B, T, H * D), w[p + "self_attn.o_proj.weight"])
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            gate = F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"]))
            up = F.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + F.linear(gate * up, w[p + "mlp.down_proj.weight"])
        x = rms_norm(x, w["norm.weight"], c.rms_norm_eps)
        logits = F.linear(x, w["lm_head.weight"])
        return logits, KVCache(new_k, new_v)
