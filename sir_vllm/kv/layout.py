"""Reading and writing token slots of one layer of vLLM's paged KV cache.

vLLM 0.32 hands a connector one tensor per layer, a logical
`[num_blocks, kv_heads, block_size, 2·head_dim]` view (keys in the first half
of the last dim, values in the second) whatever the physical stride order.
A slot is `block_id · block_size + offset`. GPU backends store each token's
K|V row as that view says, so plain indexing works; the CPU backend packs each
(block, head) page per ISA and needs its own adapter (`cpu_layout.py`).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KVLayout:
    """Gather/scatter of K/V rows at flat slot ids, for one layer tensor."""

    def read(self, kv_layer: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V at `slots`, each [T, kv_heads, head_dim]."""
        raise NotImplementedError

    def write(self, kv_layer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V [T, kv_heads, head_dim] at `slots`, in place."""
        raise NotImplementedError


def check_layer(kv_layer: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_blocks, kv_heads, block_size, head_dim) of a per-layer KV view."""
    if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
        raise ValueError(f"expected [blocks, heads, block_size, 2*head_dim], got {tuple(kv_layer.shape)}")
    if kv_layer.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(f"quantized KV cache ({kv_layer.dtype}) is not supported")
    num_blocks, heads, block_size, content = kv_layer.shape
    return num_blocks, heads, block_size, content // 2


def split_slots(slots: torch.Tensor, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.to(device=device, dtype=torch.long)
    return slots // block_size, slots % block_size


class GpuFlashLayout(KVLayout):
    """FlashAttention / Triton / FlexAttention: indexing the logical view.

    The physical order (LBNHC, LBHNC, ...) is already folded into the view's
    strides, so this works on any device and stride order, CUDA included.
    """

    def read(self, kv_layer, slots):
        _, _, block_size, head_dim = check_layer(kv_layer)
        block, offset = split_slots(slots, block_size, kv_layer.device)
        rows = kv_layer[block, :, offset]  # [T, H, 2D], a copy
        return rows[..., :head_dim], rows[..., head_dim:]

    def write(self, kv_layer, slots, k, v):
        _, _, block_size, _ = check_layer(kv_layer)
        block, offset = split_slots(slots, block_size, kv_layer.device)
        kv_layer[block, :, offset] = torch.cat((k, v), dim=-1).to(kv_layer.device, kv_layer.dtype)


GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION")
CPU_BACKENDS = ("CPU_ATTN",)


def layout_for(kv_layer: torch.Tensor, backend_name: str | None = None) -> KVLayout:
    """The layout adapter for a layer tensor and its vLLM attention backend.

    `backend_name` is the backend's `get_name()`; without it the device decides
    (vLLM's CPU build always uses CPU_ATTN).
    """
    if backend_name is None:
        backend_name = "CPU_ATTN" if kv_layer.device.type == "cpu" else "FLASH_ATTN"
    if backend_name in GPU_BACKENDS:
        return GpuFlashLayout()
    if backend_name in CPU_BACKENDS:
        from sir_vllm.kv.cpu_layout import CpuVecLayout
        return CpuVecLayout()
    raise NotImplementedError(f"no KV layout adapter for attention backend {backend_name!r}")
