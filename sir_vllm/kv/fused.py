"""Compaction of every layer at once for GPU-style layouts, on Triton or torch.

`compact_layers` is the one entry point; its two implementations take the
same arguments and give the same result, bit for bit (compiled Triton; see
`triton_compact` for the interpreter's bf16 rounding):

  triton  one kernel launch for all layers (three when src and dst overlap),
          chosen for CUDA tensors when `triton` imports;
  torch   a few indexing ops per layer, chosen otherwise (CPU tensors, no
          Triton, layers that do not share shape and strides).

Force one with `impl=` or the environment variable SIR_VLLM_COMPACT_IMPL
(`torch`, `triton`, `auto`). Forcing `triton` on CPU tensors runs the kernel
under Triton's interpreter: slow, but it checks the kernel's logic in CI.
"""

from __future__ import annotations

import os

import torch

from sir_vllm.kv import triton_compact
from sir_vllm.kv.layout import check_layer
from sir_vllm.kv.torch_compact import compact_torch

IMPL_ENV = "SIR_VLLM_COMPACT_IMPL"
IMPLS = ("torch", "triton")


def uniform_layers(layers) -> bool:
    """Same device, dtype, shape and strides, unit channel stride: what one launch needs."""
    first = layers[0]
    return first.stride(-1) == 1 and all(
        kv.device == first.device and kv.dtype == first.dtype and kv.shape == first.shape
        and kv.stride() == first.stride() for kv in layers)


def select_impl(layers, impl: str | None = None) -> str:
    """`impl`, else $SIR_VLLM_COMPACT_IMPL, else auto: triton on CUDA when it can run."""
    impl = impl or os.environ.get(IMPL_ENV) or "auto"
    if impl == "auto":
        on_cuda = layers[0].device.type == "cuda"
        runs = on_cuda and triton_compact.available() and uniform_layers(layers)
        return "triton" if runs else "torch"
    if impl not in IMPLS:
        raise ValueError(f"unknown compaction impl {impl!r} (expected auto, {', '.join(IMPLS)})")
    if impl == "triton":
        if not triton_compact.available():
            raise RuntimeError("compaction impl 'triton' forced but triton does not import")
        if not uniform_layers(layers):
            raise ValueError("the triton compaction needs layers of one shape, strides and dtype")
    return impl


def compact_layers(layers, src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: torch.Tensor,
                   rope, impl: str | None = None, **tuning) -> str:
    """Move tokens src_slots[t] -> dst_slots[t] in every layer, keys rotated by delta[t].

    `layers`: logical [num_blocks, kv_heads, block_size, 2*head_dim] views
    (any physical stride order). Slots and deltas: int64 CPU tensors, already
    reduced to the tokens that move or rotate, dst distinct (see
    `compact.copy_kept_tokens`). src and dst may overlap. Returns the impl used.
    """
    layers = list(layers)
    for kv in layers:
        check_layer(kv)
    chosen = select_impl(layers, impl)
    if src_slots.numel():
        if chosen == "triton":
            triton_compact.compact_triton(layers, src_slots, dst_slots, delta, rope, **tuning)
        else:
            compact_torch(layers, src_slots, dst_slots, delta, rope)
    return chosen
