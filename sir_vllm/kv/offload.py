"""Tokens' KV out of the paged cache into host memory, and back into new slots.

The KV-pool tier below the pins (`connector.offload`): when the pool must
give up a session's pinned blocks, their tokens are read out, every layer,
into host tensors; the session's next turn writes the kept ones back into
its new slots, keys re-rotated to their new positions (fp32, Δ = 0 rows bit
for bit), instead of recomputing them. Reads and writes go through the
layer's `KVLayout`, so vLLM's packed CPU pages and GPU layouts both work; a
GPU cache's copies go to CPU memory (synchronous: the blocks are reused by
the step's forward pass right after).
"""

from __future__ import annotations

import torch

from sir_vllm.kv.layout import KVLayout
from sir_vllm.kv.rope import RopeSpec, rotate_keys

HOST = torch.device("cpu")

# One saved layer: K and V of the saved tokens, each [T, kv_heads, head_dim], on the host.
SavedLayer = tuple[torch.Tensor, torch.Tensor]


def save_tokens(kv_caches: dict[str, torch.Tensor], layout: KVLayout, slots) -> list[SavedLayer]:
    """K and V at `slots` of every layer, copied to host memory (token i = slots[i])."""
    slots = torch.as_tensor(slots, dtype=torch.long, device=HOST).flatten()
    saved = []
    for kv in kv_caches.values():
        k, v = layout.read(kv, slots)
        saved.append((k.to(HOST), v.to(HOST)))
    return saved


def saved_bytes(saved: list[SavedLayer]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in saved)


def restore_tokens(kv_caches: dict[str, torch.Tensor], layout: KVLayout, saved: list[SavedLayer],
                   index, dst_slots, delta=None, rope: RopeSpec | None = None) -> None:
    """Write saved tokens `index[i]` into `dst_slots[i]` of every layer, keys re-rotated by `delta[i]`."""
    index = torch.as_tensor(index, dtype=torch.long, device=HOST).flatten()
    dst = torch.as_tensor(dst_slots, dtype=torch.long, device=HOST).flatten()
    delta = (torch.zeros_like(index) if delta is None
             else torch.as_tensor(delta, dtype=torch.long, device=HOST).flatten())
    if not (index.shape == dst.shape == delta.shape):
        raise ValueError(f"index {tuple(index.shape)}, dst {tuple(dst.shape)}, delta {tuple(delta.shape)}")
    if len(saved) != len(kv_caches):
        raise ValueError(f"{len(saved)} saved layers for {len(kv_caches)} cache layers")
    rotate = bool((delta != 0).any())
    if rotate and rope is None:
        raise ValueError("nonzero delta needs a RopeSpec")
    for kv, (k, v) in zip(kv_caches.values(), saved):
        k, v = k[index], v[index]
        if rotate:
            k = rotate_keys(k, delta, rope.inv_freq.to(HOST), rope.rotary_dim, rope.is_neox)
        layout.write(kv, dst, k.to(kv.device), v.to(kv.device))
