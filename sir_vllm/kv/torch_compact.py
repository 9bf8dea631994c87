"""The torch path of the fused compaction: what CPU tensors run, and the fallback.

A handful of ops per layer: gather the kept rows (a copy, so the layer is
fully read before it is written), rotate the rotary channels of the tokens
with Δ ≠ 0 in fp32 (the arithmetic of `rope.rotate_keys`, with cos/sin
computed once for all layers), scatter the rows to their new slots.
When a slot's [heads, 2·head_dim] row has one stride per slot (FlashAttention's
[blocks, block_size, heads, 2D] memory), rows move as whole rows
(`index_select` / `index_copy_`); otherwise by (block, offset) indexing.
"""

from __future__ import annotations

import torch

from sir_vllm.kv.rope import rope_cos_sin


def slot_view(kv: torch.Tensor) -> torch.Tensor | None:
    """The layer as [num_slots, heads·2D] or [num_slots, heads, 2D] (a view), if block b's
    slot o sits at (b·BS + o)·stride; 2-D when a slot's row is contiguous across heads."""
    num_blocks, heads, block_size, width = kv.shape
    s_block, s_head, s_slot, s_chan = kv.stride()
    if s_block != block_size * s_slot:
        return None
    slots = num_blocks * block_size
    if s_chan == 1 and s_head == width:
        return kv.as_strided((slots, heads * width), (s_slot, 1), kv.storage_offset())
    return kv.as_strided((slots, heads, width), (s_slot, s_head, s_chan), kv.storage_offset())


def rotate_into(rows: torch.Tensor, cos, sin, rotary_dim: int, is_neox: bool) -> None:
    """rows [T, H, 2D]: rotate the first rotary_dim channels in place.

    The arithmetic of `rope.apply_rotation`, op for op in fp32 (so the bits
    are the same), written straight back instead of concatenated and cast.
    """
    x = rows[..., :rotary_dim].to(torch.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        half = rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        out1, out2 = rows[..., :half], rows[..., half:rotary_dim]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out1, out2 = rows[..., 0:rotary_dim:2], rows[..., 1:rotary_dim:2]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # both before either write: x may alias rows
    out1.copy_(y1)
    out2.copy_(y2)


def compact_torch(layers, src_slots, dst_slots, delta, rope) -> None:
    """Same arguments and result as `triton_compact.compact_triton`.

    Every row is rotated (one pass, no gather of the rotated subset); the few
    Δ = 0 rows (sinks) get their original key bits back before the write.
    """
    first = layers[0]
    _, heads, block_size, width = first.shape
    device = first.device
    src, dst = src_slots.to(device), dst_slots.to(device)
    rotate = bool((delta != 0).any())
    if rotate:
        still = torch.nonzero(delta == 0).flatten().to(device)
        cos, sin = rope_cos_sin(delta.to(device), rope.inv_freq)
        rot = rope.rotary_dim
    for kv in layers:
        view = slot_view(kv)
        if view is not None:
            rows = view.index_select(0, src).view(-1, heads, width)  # [T, H, 2D], a copy
        else:
            rows = kv[src // block_size, :, src % block_size]
        if rotate:
            sinks = rows[still, :, :rot] if still.numel() else None  # a copy
            rotate_into(rows, cos, sin, rot, rope.is_neox)
            if sinks is not None:
                rows[still, :, :rot] = sinks
        if view is not None:
            view.index_copy_(0, dst, rows.reshape(-1, *view.shape[1:]))
        else:
            kv[dst // block_size, :, dst % block_size] = rows
