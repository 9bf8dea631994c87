"""KV mechanism: move kept tokens' KV inside vLLM's paged cache.

rope.py            re-rotate post-RoPE keys by a position delta (fp32)
layout.py          read/write token slots of one layer; GPU (plain indexing)
cpu_layout.py      vLLM's CPU packed pages (the one place that calls vLLM, lazily)
compact.py         copy kept tokens to new slots, keys re-rotated (checks, dispatch by layout)
fused.py           every layer at once for GPU layouts: picks one of the two below
triton_compact.py  the fused Triton kernel (compiled on CUDA, interpreted on CPU)
torch_compact.py   the same move in a few torch ops per layer
offload.py         tokens out to host memory and back into new slots (the host tier)
"""

from sir_vllm.kv.compact import copy_kept_tokens
from sir_vllm.kv.cpu_layout import CpuVecLayout
from sir_vllm.kv.fused import compact_layers, select_impl
from sir_vllm.kv.layout import GpuFlashLayout, KVLayout, layout_for
from sir_vllm.kv.rope import RopeSpec, inv_freq_from_rotary, rotate_keys

__all__ = [
    "CpuVecLayout", "GpuFlashLayout", "KVLayout", "RopeSpec", "compact_layers", "copy_kept_tokens",
    "inv_freq_from_rotary", "layout_for", "rotate_keys", "select_impl",
]
