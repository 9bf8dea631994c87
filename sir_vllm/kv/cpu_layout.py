"""The CPU attention backend's packed KV pages (ISA "vec" and "vec16").

vLLM's CPU backend stores each (block, head) page of a layer as 2·BS·D
contiguous elements: the keys transposed, [D, BS], then the values, [BS, D].
So `kv[b, h, o, :D]` is NOT token o's key. vLLM has a pack op and no unpack
op: we write with vLLM's own op (the layout is never hand-written on the write
side) and read through a strided view of the pages. That view is proven once
per (ISA, dtype, block size, head size) by packing a probe with vLLM's op and
reading it back; a packing that differs (e.g. AMX) is refused, never misread.
"""

from __future__ import annotations

import torch

from sir_vllm import vllm_adapter
from sir_vllm.kv.layout import KVLayout, check_layer, split_slots


# --- reading through a view, proven against the op ---------------------------

def page_views(kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as [B, H, D, BS] and values as [B, H, BS, D], views of the pages."""
    num_blocks, heads, block_size, head_dim = check_layer(kv_layer)
    pages = kv_layer.view(num_blocks, heads, 2 * block_size * head_dim)  # each page must be dense
    keys = pages[..., : block_size * head_dim].view(num_blocks, heads, head_dim, block_size)
    values = pages[..., block_size * head_dim :].view(num_blocks, heads, block_size, head_dim)
    return keys, values


def read_pages(kv_layer: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather K and V [T, H, D] at `slots` through the page views (copies)."""
    keys, values = page_views(kv_layer)
    block, offset = split_slots(slots, kv_layer.shape[2], kv_layer.device)
    return keys[block, :, :, offset], values[block, :, offset]


def prove_view(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> None:
    """Pack random K/V into every slot of a 2-block, 2-head probe and read it back."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.zeros(2, 2, block_size, 2 * head_dim, dtype=dtype)
    slots = torch.randperm(2 * block_size, generator=gen)
    k = torch.randn(2 * block_size, 2, head_dim, generator=gen).to(dtype)
    v = torch.randn(2 * block_size, 2, head_dim, generator=gen).to(dtype)
    vllm_adapter.cpu_attn_pack(probe, slots, k, v, isa)
    got_k, got_v = read_pages(probe, slots)
    if not (torch.equal(got_k, k) and torch.equal(got_v, v)):
        raise NotImplementedError(f"vLLM's CPU KV pages for ISA {isa!r} ({dtype}, block {block_size}, "
                                  f"head {head_dim}) are not in the vec layout this reader knows")


class CpuVecLayout(KVLayout):
    """vLLM CPU_ATTN pages: read through a proven view, write with vLLM's op."""

    def __init__(self, isa: str | None = None):
        self.isa = isa  # None: ask vLLM, as its backend does
        self._proven: dict[tuple, str] = {}

    def isa_for(self, kv_layer: torch.Tensor) -> str:
        _, _, block_size, head_dim = check_layer(kv_layer)
        key = (kv_layer.dtype, block_size, head_dim)
        if key not in self._proven:
            isa = self.isa or vllm_adapter.cpu_attn_isa(*key)
            prove_view(isa, *key)
            self._proven[key] = isa
        return self._proven[key]

    def read(self, kv_layer, slots):
        self.isa_for(kv_layer)
        return read_pages(kv_layer, slots)

    def write(self, kv_layer, slots, k, v):
        isa = self.isa_for(kv_layer)
        k, v = (x.to(kv_layer.dtype).contiguous() for x in (k, v))
        vllm_adapter.cpu_attn_pack(kv_layer, slots.to(torch.long).contiguous(), k, v, isa)
