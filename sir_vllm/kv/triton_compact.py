"""The fused compaction kernel: gather, re-rotate and scatter every layer in one launch.

One program moves BLOCK_T kept tokens of HEAD_GROUP kv heads of one layer: it loads each
token's K|V row, rotates the key's rotary pairs by Δ in fp32 with the cos/sin
the torch path uses (so fp32 results are bit for bit the torch path's; FMA
contraction is switched off for the same reason), casts back, and stores the
row at its new slot. Layers are reached through a table of base pointers, so
separate tensors and views of one storage take the same path; they must share
shape, strides and dtype, as vLLM's per-layer views do.

Programs run in no particular order, so a token whose source slot is another
token's destination ("conflicting": compaction in place) is first copied to a
staging buffer, for every layer, by the same kernel; then the others move
straight from the cache and the staged ones from the buffer: three launches
instead of one, extra traffic only for the conflicting tokens.

On CUDA tensors the kernel is compiled with `triton.jit`; on CPU tensors it
runs under Triton's interpreter (what CI uses to check its logic). Triton
3.9's interpreter casts fp32 -> bf16 by truncation where compiled code rounds
to nearest even, so interpreted bf16 keys can differ by one bf16 ulp; fp32 and
fp16 are bit for bit the torch path's there too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path needs no Triton
    triton = tl = None

BLOCK_T = 16      # kept tokens per program
HEAD_GROUP = 1    # kv heads per program (they share the angles' loads)
NUM_WARPS = 4
VEC_BYTES = 16    # widest vector load; alignment hints are given only when every offset allows it


def available() -> bool:
    return triton is not None


def compact_rows_kernel(
    src_layers, dst_layers,       # int64 [L]: base address of each layer (source / destination)
    src_rows, dst_rows,           # int64 [T]: element offset of each token's slot row in its layer
    deltas,                       # int64 [T]: Δ; 0 = copy the row bit for bit
    cos, sin,                     # fp32 [T, ROT_HALF]: angles Δ·inv_freq, row t for token t
    num_tokens, src_head_stride, dst_head_stride,
    DTYPE: tl.constexpr, HEADS: tl.constexpr, HEAD_GROUP: tl.constexpr,
    ROT_HALF: tl.constexpr, HALF_P: tl.constexpr,
    PAIR_STRIDE: tl.constexpr, PAIR_OFFSET: tl.constexpr,
    REST_START: tl.constexpr, REST: tl.constexpr, REST_P: tl.constexpr,
    BLOCK_T: tl.constexpr, ALIGN: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    layer = pid_g // (HEADS // HEAD_GROUP)
    first_head = (pid_g % (HEADS // HEAD_GROUP)) * HEAD_GROUP
    src = tl.load(src_layers + layer).to(tl.pointer_type(DTYPE))
    dst = tl.load(dst_layers + layer).to(tl.pointer_type(DTYPE))
    if ALIGN > 1:
        src = tl.multiple_of(src, 16)  # VEC_BYTES
        dst = tl.multiple_of(dst, 16)

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    src_row = tl.multiple_of(tl.load(src_rows + t, mask=t_ok, other=0), ALIGN)
    dst_row = tl.multiple_of(tl.load(dst_rows + t, mask=t_ok, other=0), ALIGN)
    # Channels no rotation touches (keys past rotary_dim, all values): a plain copy.
    r = REST_START + tl.arange(0, REST_P)
    r_ok = t_ok[:, None] & (r[None, :] < REST_START + REST)
    if ROT_HALF > 0:
        # Pair (c1, c2): neox (i, i + rotary_dim/2), GPT-J (2i, 2i + 1). Angles: once per head group.
        i = tl.arange(0, HALF_P)
        c1 = i * PAIR_STRIDE
        c2 = c1 + PAIR_OFFSET
        p_ok = t_ok[:, None] & (i[None, :] < ROT_HALF)
        rotate = (tl.load(deltas + t, mask=t_ok, other=0) != 0)[:, None]
        angle = t[:, None] * ROT_HALF + i[None, :]
        c = tl.load(cos + angle, mask=p_ok & rotate, other=1.0)
        s = tl.load(sin + angle, mask=p_ok & rotate, other=0.0)

    for h in range(HEAD_GROUP):
        s_row = (src_row + (first_head + h) * src_head_stride)[:, None]
        d_row = (dst_row + (first_head + h) * dst_head_stride)[:, None]
        rest = tl.load(src + s_row + r[None, :], mask=r_ok)
        tl.store(dst + d_row + r[None, :], rest, mask=r_ok)
        if ROT_HALF > 0:
            x1 = tl.load(src + s_row + c1[None, :], mask=p_ok)
            x2 = tl.load(src + s_row + c2[None, :], mask=p_ok)
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            y1 = (a * c - b * s).to(DTYPE)
            y2 = (b * c + a * s).to(DTYPE)
            # Δ = 0: the loaded bits themselves (x·1 - y·0 would flip a -0.0).
            tl.store(dst + d_row + c1[None, :], tl.where(rotate, y1, x1), mask=p_ok)
            tl.store(dst + d_row + c2[None, :], tl.where(rotate, y2, x2), mask=p_ok)


@functools.cache
def _kernel(interpreted: bool):
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(compact_rows_kernel)
    return triton.jit(compact_rows_kernel)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


# --- the host side ------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One side of a move: each layer's base address and how heads are strided."""

    bases: torch.Tensor       # int64 [L] on the device
    head_stride: int          # elements
    aligned: bool             # every base address is VEC_BYTES-aligned


@functools.lru_cache(maxsize=16)
def _bases(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ptrs, dtype=torch.int64, device=device)


def side_of(layers, cache: bool = True) -> Side:
    """The layers' Side; the worker's layers never change, so their table is built once."""
    ptrs = tuple(kv.data_ptr() for kv in layers)
    device = layers[0].device
    bases = _bases(ptrs, device) if cache else torch.tensor(ptrs, dtype=torch.int64, device=device)
    return Side(bases, layers[0].stride(1), all(p % VEC_BYTES == 0 for p in ptrs))


def slot_rows(slots: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """Element offset of each slot's row (head 0, channel 0) inside a layer view."""
    block_size = layer.shape[2]
    return (slots // block_size) * layer.stride(0) + (slots % block_size) * layer.stride(2)


@dataclass
class Launch:
    """One kernel launch with its arguments on the device: `run()` only enqueues it."""

    src: Side
    dst: Side
    index: torch.Tensor       # int64 [3, T] on the device: source rows, destination rows, Δ
    cos: torch.Tensor
    sin: torch.Tensor
    constants: dict
    grid: tuple[int, int]
    options: dict

    def run(self) -> None:
        src_rows, dst_rows, deltas = self.index
        interpreted = self.index.device.type != "cuda"
        _kernel(interpreted)[self.grid](
            self.src.bases, self.dst.bases, src_rows, dst_rows, deltas, self.cos, self.sin,
            self.index.shape[1], self.src.head_stride, self.dst.head_stride,
            **self.constants, **self.options)


def prepare_launch(src: Side, dst: Side, rows_from: torch.Tensor, rows_to: torch.Tensor,
                   deltas: torch.Tensor, rope, *, dtype: torch.dtype, heads: int, head_dim: int,
                   block_t: int = BLOCK_T, head_group: int = HEAD_GROUP,
                   num_warps: int = NUM_WARPS) -> Launch:
    """A launch moving len(rows_from) tokens of every layer (CPU int64 rows and Δ in)."""
    from sir_vllm.kv.rope import rope_cos_sin

    device = src.bases.device
    rot = rope.rotary_dim if rope is not None else 0
    half = rot // 2
    vec = VEC_BYTES // torch.empty((), dtype=dtype).element_size()
    aligned = (src.aligned and dst.aligned
               and all(x % vec == 0 for x in (src.head_stride, dst.head_stride, half, rot, head_dim))
               and bool((rows_from % vec == 0).all()) and bool((rows_to % vec == 0).all()))
    index = torch.stack((rows_from, rows_to, deltas)).to(device)  # one upload
    if rope is None:  # the kernel reads no angles
        cos = sin = torch.empty((1,), dtype=torch.float32, device=device)
    else:  # the torch path's own function, on the device: bit for bit its angles
        cos, sin = (x.contiguous() for x in rope_cos_sin(index[2], rope.inv_freq))
    neox = rope is None or rope.is_neox
    constants = dict(
        DTYPE=_tl_dtype(dtype), HEADS=heads, HEAD_GROUP=head_group,
        ROT_HALF=half, HALF_P=triton.next_power_of_2(max(half, 1)),
        PAIR_STRIDE=1 if neox else 2, PAIR_OFFSET=half if neox else 1,
        REST_START=rot, REST=2 * head_dim - rot, REST_P=triton.next_power_of_2(2 * head_dim - rot),
        BLOCK_T=block_t, ALIGN=vec if aligned else 1)
    options = {} if device.type != "cuda" else {"num_warps": num_warps, "enable_fp_fusion": False}
    if heads % head_group:
        raise ValueError(f"head_group {head_group} does not divide {heads} kv heads")
    grid = (triton.cdiv(max(rows_from.numel(), 1), block_t), src.bases.numel() * heads // head_group)
    return Launch(src, dst, index, cos, sin, constants, grid, options)


class TritonCompaction:
    """The launches of one compaction, prepared; `run()` enqueues them in order.

    Without overlap that is one launch. With it: stage the conflicting tokens'
    rows ([L, C, H, 2D]) for every layer, move the others, then the staged ones.
    """

    def __init__(self, layers, src_slots, dst_slots, delta, rope, **tuning):
        first = layers[0]
        _, heads, _, width = first.shape
        common = dict(dtype=first.dtype, heads=heads, head_dim=width // 2, **tuning)
        cache = side_of(layers)
        src_rows, dst_rows = slot_rows(src_slots, first), slot_rows(dst_slots, first)
        conflict = torch.isin(src_slots, dst_slots) & (src_slots != dst_slots)
        self.stage = None
        if not bool(conflict.any()):
            self.launches = [prepare_launch(cache, cache, src_rows, dst_rows, delta, rope, **common)]
            return
        staged, direct = torch.nonzero(conflict).flatten(), torch.nonzero(~conflict).flatten()
        self.stage = torch.empty((len(layers), staged.numel(), heads, width), dtype=first.dtype,
                                 device=first.device)
        stage = side_of([self.stage[i].unsqueeze(2) for i in range(len(layers))], cache=False)
        stage_rows = torch.arange(staged.numel(), dtype=torch.long) * self.stage.stride(1)
        self.launches = [
            prepare_launch(cache, stage, src_rows[staged], stage_rows, torch.zeros_like(staged), None,
                           **common),
            prepare_launch(cache, cache, src_rows[direct], dst_rows[direct], delta[direct], rope,
                           **common),
            prepare_launch(stage, cache, stage_rows, dst_rows[staged], delta[staged], rope, **common),
        ]
        self.launches = [x for x in self.launches if x.index.shape[1]]

    def run(self) -> None:
        for launch in self.launches:
            launch.run()


def compact_triton(layers, src_slots, dst_slots, delta, rope, **tuning) -> None:
    """The Triton path of `fused.compact_layers`: same arguments, same result as `compact_torch`.

    `tuning`: block_t (tokens per program), head_group (kv heads per program), num_warps.
    """
    TritonCompaction(layers, src_slots, dst_slots, delta, rope, **tuning).run()
