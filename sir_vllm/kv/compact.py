"""Moving kept tokens' KV to new slots, keys re-rotated to their new positions.

This is SirLLM's compaction inside vLLM's paged cache: token t kept from slot
src[t] (position p) lands in slot dst[t] (position p' = p + delta[t]).
"""

from __future__ import annotations

import torch

from sir_vllm.kv.layout import KVLayout
from sir_vllm.kv.rope import RopeSpec, apply_rotation, rope_cos_sin


def copy_kept_tokens(kv_caches: dict[str, torch.Tensor], layout: KVLayout, src_slots, dst_slots,
                     delta=None, rope: RopeSpec | None = None) -> None:
    """For every layer: read K/V at src_slots, rotate keys by delta, write at dst_slots.

    Each layer is fully read before it is written, so src and dst may overlap
    (compaction in place). Tokens that neither move nor rotate are not
    rewritten (a shared prefix block stays untouched); Δ = 0 keys are copied
    bit for bit. cos/sin are computed once for all layers.
    """
    src = torch.as_tensor(src_slots, dtype=torch.long).flatten()
    dst = torch.as_tensor(dst_slots, dtype=torch.long).flatten()
    delta = torch.zeros_like(src) if delta is None else torch.as_tensor(delta, dtype=torch.long).flatten()
    if not (src.shape == dst.shape == delta.shape):
        raise ValueError(f"src {tuple(src.shape)}, dst {tuple(dst.shape)}, delta {tuple(delta.shape)}")
    if torch.unique(dst).numel() != dst.numel():
        raise ValueError("dst_slots must be distinct")
    if bool((delta != 0).any()) and rope is None:
        raise ValueError("nonzero delta needs a RopeSpec")

    work = (src != dst) | (delta != 0)
    src, dst, delta = src[work], dst[work], delta[work]
    if src.numel() == 0:
        return
    rotated = torch.nonzero(delta != 0).flatten()
    angles = {}  # device -> (rows, cos, sin)

    for kv in kv_caches.values():
        k, v = layout.read(kv, src)  # copies: safe to modify and to write over src
        if rotated.numel():
            if k.device not in angles:
                rows = rotated.to(k.device)
                angles[k.device] = (rows, *rope_cos_sin(delta.to(k.device)[rows], rope.inv_freq))
            rows, cos, sin = angles[k.device]
            k = k.clone()
            k[rows, :, : rope.rotary_dim] = apply_rotation(k[rows], cos, sin, rope.rotary_dim,
                                                           rope.is_neox).to(k.dtype)
        layout.write(kv, dst, k, v)
