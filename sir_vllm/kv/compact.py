"""Moving kept tokens' KV to new slots, keys re-rotated to their new positions.

This is SirLLM's compaction inside vLLM's paged cache: token t kept from slot
src[t] (position p) lands in slot dst[t] (position p' = p + delta[t]).
GPU-style layouts (`GpuFlashLayout`) move every layer at once (`fused.py`:
one Triton launch on CUDA, a few torch ops elsewhere); other layouts (vLLM's
packed CPU pages) go layer by layer through the layout's read and write.
"""

from __future__ import annotations

import torch

from sir_vllm.kv.fused import compact_layers
from sir_vllm.kv.layout import GpuFlashLayout, KVLayout
from sir_vllm.kv.rope import RopeSpec, apply_rotation, rope_cos_sin


def kept_token_moves(src_slots, dst_slots, delta, rope
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, dst, delta) as int64 CPU tensors, checked, reduced to the tokens that move or rotate."""
    src = torch.as_tensor(src_slots, dtype=torch.long, device="cpu").flatten()
    dst = torch.as_tensor(dst_slots, dtype=torch.long, device="cpu").flatten()
    delta = (torch.zeros_like(src) if delta is None
             else torch.as_tensor(delta, dtype=torch.long, device="cpu").flatten())
    if not (src.shape == dst.shape == delta.shape):
        raise ValueError(f"src {tuple(src.shape)}, dst {tuple(dst.shape)}, delta {tuple(delta.shape)}")
    if torch.unique(dst).numel() != dst.numel():
        raise ValueError("dst_slots must be distinct")
    if bool((delta != 0).any()) and rope is None:
        raise ValueError("nonzero delta needs a RopeSpec")
    work = (src != dst) | (delta != 0)
    return src[work], dst[work], delta[work]


def copy_kept_tokens(kv_caches: dict[str, torch.Tensor], layout: KVLayout, src_slots, dst_slots,
                     delta=None, rope: RopeSpec | None = None, *, impl: str | None = None) -> str:
    """For every layer: read K/V at src_slots, rotate keys by delta, write at dst_slots.

    Each layer is fully read before it is written, so src and dst may overlap
    (compaction in place). Tokens that neither move nor rotate are not
    rewritten (a shared prefix block stays untouched); Δ = 0 keys are copied
    bit for bit. cos/sin are computed once for all layers. `impl` forces the
    fused path's implementation for GPU layouts (see `fused.select_impl`).
    Returns the path taken: "triton", "torch" or "layout".
    """
    src, dst, delta = kept_token_moves(src_slots, dst_slots, delta, rope)
    if isinstance(layout, GpuFlashLayout):
        return compact_layers(kv_caches.values(), src, dst, delta, rope, impl=impl)
    if src.numel():
        copy_by_layout(kv_caches.values(), layout, src, dst, delta, rope)
    return "layout"


def copy_by_layout(layers, layout: KVLayout, src, dst, delta, rope) -> None:
    """Layer by layer through `layout.read` / `layout.write` (the CPU pages' path)."""
    rotated = torch.nonzero(delta != 0).flatten()
    angles = {}  # device -> (rows, cos, sin)
    for kv in layers:
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
