"""Re-rotating keys that are already stored after RoPE.

vLLM caches keys with their rotary embedding applied. When a kept token moves
from position p to p', its key must become R(p')·k. Rotations compose,
R(p') = R(p'-p)·R(p), so rotating the cached key by Δ = p'-p is enough; the
un-rotated key is never needed. Angles are Δ·inv_freq computed in fp32: Δ is
often negative and is never an index into a cos/sin cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


def rope_cos_sin(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of Δ·inv_freq in fp32, shape [T, rotary_dim // 2]."""
    angles = delta.to(torch.float32)[:, None] * inv_freq.to(delta.device, torch.float32)[None, :]
    return angles.cos(), angles.sin()


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                   is_neox: bool) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [T, H, D] by angles [T, rotary_dim//2].

    Returns a new fp32 tensor of the rotated channels only, [T, H, rotary_dim].
    neox pairs channel i with i + rotary_dim/2; GPT-J pairs 2i with 2i+1.
    """
    x = x[..., :rotary_dim].to(torch.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotate_keys(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                is_neox: bool) -> torch.Tensor:
    """Keys k [T, H, D] stored at p, returned as they would be stored at p + delta[t].

    Rows with Δ = 0 (sinks, prefixes) are copied bit for bit; channels beyond
    rotary_dim pass through. Computes in fp32 and casts back to k's dtype.
    """
    assert k.dim() == 3 and delta.shape == (k.shape[0],), (k.shape, delta.shape)
    assert rotary_dim % 2 == 0 and rotary_dim <= k.shape[-1] and inv_freq.numel() == rotary_dim // 2
    out = k.clone()
    rows = torch.nonzero(delta.to(k.device) != 0).flatten()
    if rows.numel() == 0:
        return out
    cos, sin = rope_cos_sin(delta.to(k.device)[rows], inv_freq)
    out[rows, :, :rotary_dim] = apply_rotation(k[rows], cos, sin, rotary_dim, is_neox).to(k.dtype)
    return out


@dataclass(frozen=True)
class RopeSpec:
    """What re-rotation needs to know about a model's RoPE."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], fp32
    rotary_dim: int
    is_neox: bool

    def rotate(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return rotate_keys(k, delta, self.inv_freq, self.rotary_dim, self.is_neox)

    @classmethod
    def from_rotary(cls, rotary_emb) -> RopeSpec:
        """From a vLLM rotary module (e.g. `model.layers[0].self_attn.rotary_emb`)."""
        return cls(inv_freq_from_rotary(rotary_emb), int(rotary_emb.rotary_dim),
                   bool(rotary_emb.is_neox_style))


# --- vLLM 0.32.0 rotary modules (duck-typed: no vLLM import) ----------------

def inv_freq_from_rotary(rotary_emb) -> torch.Tensor:
    """The fp32 inv_freq a vLLM rotary module actually rotates by.

    Scaled variants override `_compute_inv_freq` (llama3, NTK, YaRN, which takes
    the scaling factor instead of the base); linear scaling divides positions
    instead, which is the same as dividing inv_freq. Whatever we derive is
    checked against the module's own cos/sin cache (a YaRN-style magnitude
    factor is allowed: it was applied once at p and a pure rotation keeps it);
    variants that still disagree (dynamic NTK) fall back to reading the angles
    off an fp32 cache, else are refused rather than silently mis-rotated.
    """
    rotary_dim = int(rotary_emb.rotary_dim)
    inv_freq = None
    compute = getattr(rotary_emb, "_compute_inv_freq", None)
    if compute is not None:
        arg_name = next(iter(inspect.signature(compute).parameters))  # "base" or "scaling_factor"
        inv_freq = compute(getattr(rotary_emb, arg_name)).to(torch.float32).cpu()
        factors = getattr(rotary_emb, "scaling_factors", None)  # LinearScalingRotaryEmbedding
        if factors is not None:
            if len(factors) != 1:
                raise NotImplementedError("linear RoPE scaling with several factors (LoRA)")
            inv_freq = inv_freq / float(factors[0])
        if not _matches_cache(rotary_emb, inv_freq):
            inv_freq = None
    if inv_freq is None:
        inv_freq = _inv_freq_from_fp32_cache(rotary_emb)
    if inv_freq is None or inv_freq.numel() != rotary_dim // 2:
        raise NotImplementedError(f"cannot derive inv_freq from {type(rotary_emb).__name__}")
    return inv_freq.contiguous()


def _cache_rows(rotary_emb, positions: list[int]):
    """(positions, cos, sin) read from the module's cache in fp32, or None."""
    cache = getattr(rotary_emb, "cos_sin_cache", None)
    if cache is None or cache.dim() != 2:
        return None
    positions = [p for p in positions if p < cache.shape[0]]
    rows = cache[positions].to("cpu", torch.float32)
    cos, sin = rows.chunk(2, dim=-1)
    return torch.tensor(positions), cos, sin


def _matches_cache(rotary_emb, inv_freq: torch.Tensor) -> bool:
    got = _cache_rows(rotary_emb, [1, 2, 3, 17, 100, 1000])
    if got is None:
        return True  # nothing to check against
    positions, cos, sin = got
    if cos.shape[-1] != inv_freq.numel():
        return False
    scale = torch.sqrt(cos * cos + sin * sin)  # YaRN's mscale, else 1
    want_cos, want_sin = rope_cos_sin(positions, inv_freq)
    tol = 1e-4 if rotary_emb.cos_sin_cache.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(cos, want_cos * scale, atol=tol)
                and torch.allclose(sin, want_sin * scale, atol=tol))


def _inv_freq_from_fp32_cache(rotary_emb) -> torch.Tensor | None:
    """Angles at position 1 are inv_freq itself (all below π for base > 1)."""
    cache = getattr(rotary_emb, "cos_sin_cache", None)
    if cache is None or cache.dtype != torch.float32 or cache.dim() != 2 or cache.shape[0] < 2:
        return None
    _, cos, sin = _cache_rows(rotary_emb, [1])
    inv_freq = torch.atan2(sin[0], cos[0])
    return inv_freq if _matches_cache(rotary_emb, inv_freq) else None
