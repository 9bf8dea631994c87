"""sir_vllm.kv: RoPE re-rotation, KV layouts, compaction. Synthetic tensors only."""

import pytest
import torch

from sir_vllm import vllm_adapter

from sir_vllm.kv import (
    CpuVecLayout, GpuFlashLayout, RopeSpec, copy_kept_tokens, layout_for, rotate_keys,
)

BASE = 10000.0


# --- a plain reference RoPE, independent of the code under test ---------------

def ref_inv_freq(rotary_dim, base=BASE):
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def ref_rope(x, pos, rotary_dim, is_neox, base=BASE):
    """x [T, H, D] rotated to positions pos [T], in float64."""
    x = x.to(torch.float64).clone()
    ang = pos.to(torch.float64)[:, None] * ref_inv_freq(rotary_dim, base)[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    half = rotary_dim // 2
    if is_neox:
        a, b = x[..., :half].clone(), x[..., half:rotary_dim].clone()
        x[..., :half], x[..., half:rotary_dim] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., 0:rotary_dim:2].clone(), x[..., 1:rotary_dim:2].clone()
        x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2] = a * cos - b * sin, b * cos + a * sin
    return x.to(torch.float32)


def ref_spec(rotary_dim, is_neox):
    return RopeSpec(ref_inv_freq(rotary_dim).to(torch.float32), rotary_dim, is_neox)


# --- rope ------------------------------------------------------------------------

@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotate_equals_rope_at_new_position(is_neox, rotary_dim):
    g = torch.Generator().manual_seed(1)
    T, H, D = 24, 2, 64
    raw = torch.randn(T, H, D, generator=g)
    p = torch.randint(0, 300, (T,), generator=g)
    p_new = torch.randint(0, 300, (T,), generator=g)
    p_new[:4] = p[:4]  # sinks: Δ = 0
    k = ref_rope(raw, p, rotary_dim, is_neox)

    out = rotate_keys(k, p_new - p, ref_spec(rotary_dim, is_neox).inv_freq, rotary_dim, is_neox)

    torch.testing.assert_close(out, ref_rope(raw, p_new, rotary_dim, is_neox), atol=3e-5, rtol=0)
    assert torch.equal(out[:4], k[:4])  # Δ = 0 rows untouched, bit for bit
    assert torch.equal(out[..., rotary_dim:], k[..., rotary_dim:])  # pass-through dims
    assert (p_new - p)[4:].lt(0).any()  # negative deltas were exercised


def test_rotate_keeps_dtype_and_round_trips():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(8, 2, 64, generator=g).to(torch.bfloat16)
    spec = ref_spec(64, True)
    delta = torch.tensor([0, 3, -5, 40, -40, 0, 1, -1])
    out = spec.rotate(k, delta)
    assert out.dtype == torch.bfloat16 and torch.equal(out[[0, 5]], k[[0, 5]])
    k32 = k.float()
    torch.testing.assert_close(spec.rotate(spec.rotate(k32, delta), -delta), k32, atol=1e-5, rtol=0)


ROPES = {
    "neox": dict(rope_parameters={"rope_theta": BASE}),
    "gptj": dict(rope_parameters={"rope_theta": BASE}, is_neox_style=False),
    "partial": dict(rope_parameters={"rope_theta": BASE, "partial_rotary_factor": 0.5}),
    "llama3": dict(rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "yarn": dict(rope_parameters={"rope_theta": BASE, "rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 128}),
    "linear": dict(rope_parameters={"rope_theta": BASE, "rope_type": "linear", "factor": 2.0}),
    # base rescaled inside the cache computation: inv_freq is read off the fp32 cache
    "dynamic": dict(rope_parameters={"rope_theta": BASE, "rope_type": "dynamic", "factor": 2.0,
                                     "max_trained_positions": 128}),
}


@pytest.fixture(scope="module")
def vllm_rope():
    """vLLM's own get_rope, built inside a default vLLM config (CustomOp needs one)."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        yield lambda **kw: get_rope(64, max_position=512, dtype=torch.float32, **kw)


@pytest.mark.parametrize("name", list(ROPES))
def test_matches_vllm_rotary_module(vllm_rope, name):
    """Keys vLLM rotated to p, re-rotated by p'-p, equal the keys vLLM rotates to p'."""
    rope = vllm_rope(**ROPES[name])
    spec = RopeSpec.from_rotary(rope)
    assert spec.rotary_dim == rope.rotary_dim and spec.is_neox == rope.is_neox_style
    g = torch.Generator().manual_seed(3)
    T, H, D = 16, 2, 64
    raw = torch.randn(T, H * D, generator=g)
    p = torch.randint(0, 500, (T,), generator=g)
    p_new = torch.randint(0, 500, (T,), generator=g)
    p_new[0] = p[0]

    def vllm_keys(pos):
        _, k = rope(pos, torch.zeros(T, H * D), raw.clone())
        return k.view(T, H, D)

    out = spec.rotate(vllm_keys(p), p_new - p)
    torch.testing.assert_close(out, vllm_keys(p_new), atol=1e-4, rtol=0)


def test_unknown_rotary_variant_is_refused(vllm_rope):
    """A bf16 cache that disagrees with _compute_inv_freq cannot be trusted: refuse."""
    rope = vllm_rope(**ROPES["dynamic"]).to(torch.bfloat16)
    rope.cos_sin_cache = rope.cos_sin_cache.to(torch.bfloat16)
    with pytest.raises(NotImplementedError):
        RopeSpec.from_rotary(rope)


# --- layouts ---------------------------------------------------------------------

def formula_write(kv, slots, k, v):
    """DESIGN.md's vec page layout written out index by index (test oracle)."""
    NB, H, BS, C = kv.shape
    D = C // 2
    flat = kv.view(-1)
    for t, s in enumerate(slots.tolist()):
        b, o = divmod(s, BS)
        for h in range(H):
            P = (b * H + h) * 2 * BS * D
            flat[P + torch.arange(D) * BS + o] = k[t, h]
            flat[P + BS * D + o * D + torch.arange(D)] = v[t, h]


def random_kv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.fixture(scope="module")
def cpu_ops():
    pytest.importorskip("vllm._custom_ops")


@pytest.mark.parametrize("isa,dtype,D", [("vec", torch.float32, 64), ("vec", torch.bfloat16, 64),
                                         ("vec16", torch.float32, 80)])
def test_cpu_layout_round_trip(cpu_ops, isa, dtype, D):
    NB, H, BS, T = 3, 2, 32, 20
    kv = random_kv((NB, H, BS, 2 * D), dtype, 4)
    expect = kv.clone()
    slots = torch.randperm(NB * BS, generator=torch.Generator().manual_seed(5))[:T]
    k, v = random_kv((T, H, D), dtype, 6), random_kv((T, H, D), dtype, 7)

    layout = CpuVecLayout(isa)
    layout.write(kv, slots, k, v)  # vLLM's op
    formula_write(expect, slots, k, v)

    assert torch.equal(kv, expect)  # same packing, neighbours untouched
    rk, rv = layout.read(kv, slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    b, o = slots // BS, slots % BS
    assert not torch.equal(kv[b, :, o, :D], k)  # the naive view is not the keys


def test_cpu_write_leaves_other_slots(cpu_ops):
    NB, H, BS, D = 2, 2, 32, 64
    kv = torch.zeros(NB, H, BS, 2 * D)
    layout = layout_for(kv)  # CPU tensor -> CPU_ATTN, ISA asked from vLLM
    assert isinstance(layout, CpuVecLayout) and vllm_adapter.cpu_attn_isa(torch.float32, BS, D) in ("vec", "vec16", "amx")
    first, second = torch.tensor([3, 40]), torch.tensor([4, 39])
    k1, v1 = random_kv((2, H, D), torch.float32, 8), random_kv((2, H, D), torch.float32, 9)
    k2, v2 = random_kv((2, H, D), torch.float32, 10), random_kv((2, H, D), torch.float32, 11)
    layout.write(kv, first, k1, v1)
    layout.write(kv, second, k2, v2)
    rk, rv = layout.read(kv, first)
    assert torch.equal(rk, k1) and torch.equal(rv, v1)
    rk, rv = layout.read(kv, torch.tensor([0, 63]))
    assert not rk.any() and not rv.any()


def lbnhc_layer(NB, H, BS, D, seed):
    """A logical [B, H, N, 2D] view over physical [B, N, H, 2D] memory, as vLLM builds it."""
    phys = random_kv((NB, BS, H, 2 * D), torch.float32, seed)
    return phys, phys.permute(0, 2, 1, 3)


def test_gpu_flash_layout_round_trip():
    NB, H, BS, D, T = 3, 2, 16, 32, 10
    phys, kv = lbnhc_layer(NB, H, BS, D, 12)
    expect = phys.clone()
    slots = torch.randperm(NB * BS, generator=torch.Generator().manual_seed(13))[:T]
    k, v = random_kv((T, H, D), torch.float32, 14), random_kv((T, H, D), torch.float32, 15)
    layout = layout_for(kv, "FLASH_ATTN")
    assert isinstance(layout, GpuFlashLayout)
    layout.write(kv, slots, k, v)
    for t, s in enumerate(slots.tolist()):
        expect[s // BS, s % BS] = torch.cat((k[t], v[t]), dim=-1)
    assert torch.equal(phys, expect)
    rk, rv = layout.read(kv, slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)


def test_layout_for_unknown_backend():
    with pytest.raises(NotImplementedError):
        layout_for(torch.zeros(1, 1, 16, 8), "SOME_OTHER_BACKEND")


# --- compaction ------------------------------------------------------------------

NB, H, BS, D, LAYERS = 4, 2, 32, 64, 3
BLOCK_TABLE = torch.tensor([2, 0, 3])  # the sequence's blocks, in order


def slot_of(pos):
    return BLOCK_TABLE[pos // BS] * BS + pos % BS


def make_caches(kind, spec):
    """LAYERS layers holding a 96-token sequence: keys RoPE'd at their positions."""
    layout = CpuVecLayout("vec") if kind == "cpu" else GpuFlashLayout()
    pos = torch.arange(3 * BS)
    caches, raw = {}, {}
    for i in range(LAYERS):
        kv = torch.zeros(NB, H, BS, 2 * D) if kind == "cpu" else lbnhc_layer(NB, H, BS, D, 0)[1].zero_()
        rk = random_kv((len(pos), H, D), torch.float32, 20 + i)
        v = random_kv((len(pos), H, D), torch.float32, 40 + i)
        layout.write(kv, slot_of(pos), ref_rope(rk, pos, spec.rotary_dim, spec.is_neox), v)
        caches[f"model.layers.{i}.self_attn.attn"], raw[i] = kv, (rk, v)
    return layout, caches, raw


@pytest.mark.parametrize("is_neox,rotary_dim", [(True, 64), (False, 32)])
def test_compaction_in_place(kind, is_neox, rotary_dim):
    """Sinks + a scattered keep set compacted to positions 0..K-1 in the same blocks."""
    spec = ref_spec(rotary_dim, is_neox)
    layout, caches, raw = make_caches(kind, spec)
    old = torch.cat([torch.arange(4), torch.tensor([5, 6, 9, 31, 32, 33, 60]), torch.arange(80, 96)])
    new = torch.arange(len(old))
    before = {n: layout.read(kv, slot_of(torch.arange(3 * BS))) for n, kv in caches.items()}

    copy_kept_tokens(caches, layout, slot_of(old), slot_of(new), new - old, spec)

    for i, (name, kv) in enumerate(caches.items()):
        rk, v = raw[i]
        k_got, v_got = layout.read(kv, slot_of(new))
        torch.testing.assert_close(k_got, ref_rope(rk[old], new, rotary_dim, is_neox), atol=3e-5, rtol=0)
        assert torch.equal(v_got, v[old])
        assert torch.equal(k_got[:4], before[name][0][:4])  # sinks: bit for bit
        rest = torch.arange(len(new), 3 * BS)  # slots past the kept range: untouched
        k_rest, v_rest = layout.read(kv, slot_of(rest))
        assert torch.equal(k_rest, before[name][0][rest]) and torch.equal(v_rest, before[name][1][rest])


def test_compaction_overlapping_shift_right(kind):
    """dst overlaps src moving right: a naive in-order copy would read overwritten slots."""
    spec = ref_spec(64, True)
    layout, caches, raw = make_caches(kind, spec)
    old = torch.arange(0, 40)
    new = old + 5
    copy_kept_tokens(caches, layout, slot_of(old), slot_of(new), new - old, spec)
    for i, kv in enumerate(caches.values()):
        rk, v = raw[i]
        k_got, v_got = layout.read(kv, slot_of(new))
        torch.testing.assert_close(k_got, ref_rope(rk[old], new, 64, True), atol=3e-5, rtol=0)
        assert torch.equal(v_got, v[old])


def test_copy_without_delta_is_exact_and_checks_arguments(kind):
    spec = ref_spec(64, True)
    layout, caches, _ = make_caches(kind, spec)
    kv = next(iter(caches.values()))
    src, dst = slot_of(torch.arange(10)), torch.arange(BS, BS + 10)  # block 1 is free
    copy_kept_tokens(caches, layout, src, dst)
    k_src, v_src = layout.read(kv, src)
    k_dst, v_dst = layout.read(kv, dst)
    assert torch.equal(k_src, k_dst) and torch.equal(v_src, v_dst)
    with pytest.raises(ValueError):
        copy_kept_tokens(caches, layout, src, dst, torch.ones(10, dtype=torch.long), rope=None)
    with pytest.raises(ValueError):
        copy_kept_tokens(caches, layout, src, torch.zeros(10, dtype=torch.long))
