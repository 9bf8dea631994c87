"""sir_vllm.kv.fused: every layer compacted at once, torch path and Triton kernel.

The Triton kernel runs under Triton's interpreter on CPU tensors (and compiled
on CUDA tensors when a GPU is present). Both are checked against the
reference: GpuFlashLayout reads, `rope.rotate_keys`, GpuFlashLayout writes,
all reads before any write. Synthetic tensors only; no vLLM.
"""

import json
import logging
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sir_vllm.connector.worker import SessionWorker
from sir_vllm.kv import (GpuFlashLayout, KVLayout, RopeSpec, compact_layers, copy_kept_tokens,
                         rotate_keys, select_impl)
from sir_vllm.kv import triton_compact
from sir_vllm.kv.compact import kept_token_moves
from sir_vllm.bench.compaction import CompactionBenchConfig, build_case
from sir_vllm.kv.fused import IMPL_ENV

triton = triton_compact.triton  # None without Triton: the torch cases still run
needs_triton = pytest.mark.skipif(triton is None, reason="triton does not import")
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NB, H, BS, D, LAYERS = 8, 2, 16, 64, 3
SEQ_BLOCKS = torch.tensor([2, 5, 0])      # the session's pinned blocks, in order
NEW_BLOCKS = torch.tensor([6, 1, 3])      # the next request's blocks


def slots_in(blocks, pos):
    return blocks[pos // BS] * BS + pos % BS


def inv_freq(rotary_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def spec(rotary_dim, is_neox):
    return RopeSpec(inv_freq(rotary_dim).to(torch.float32), rotary_dim, is_neox)


ROPES = {"neox": (D, True), "gptj": (D, False), "neox-partial": (D // 2, True),
         "gptj-partial": (D // 2, False)}


def make_layers(storage, dtype, device, seed=0):
    """LAYERS logical [NB, H, BS, 2D] views, random contents, in one of three memory layouts."""
    g = torch.Generator().manual_seed(seed)
    if storage == "separate":
        return [torch.randn(NB, H, BS, 2 * D, generator=g).to(dtype).to(device) for _ in range(LAYERS)]
    if storage == "one-storage":  # views of one allocation, as vLLM may hand out
        whole = torch.randn(LAYERS, NB, H, BS, 2 * D, generator=g).to(dtype).to(device)
        return [whole[i] for i in range(LAYERS)]
    assert storage == "lbnhc"  # FlashAttention's physical order: [NB, BS, H, 2D] per layer
    return [torch.randn(NB, BS, H, 2 * D, generator=g).to(dtype).to(device).permute(0, 2, 1, 3)
            for _ in range(LAYERS)]


def moves(pattern, seed=1):
    """(src, dst, delta) of one compaction; delta = new position - old position."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "cycle":  # every token's source is another one's destination
        pos = torch.arange(40)
        new = torch.roll(pos, 7)
        return slots_in(SEQ_BLOCKS, pos), slots_in(SEQ_BLOCKS, new), new - pos
    if pattern == "shift-right":  # dst overlaps src moving right, Δ > 0
        old = torch.arange(30)
        new = old + 5
        return slots_in(SEQ_BLOCKS, old), slots_in(SEQ_BLOCKS, new), new - old
    kept = torch.randperm(3 * BS - 4, generator=g)[:20].sort().values + 4
    old = torch.cat([torch.arange(4), kept])  # 4 sinks (Δ = 0) + scattered kept tokens
    new = torch.arange(len(old))
    blocks = SEQ_BLOCKS if pattern == "in-place" else NEW_BLOCKS
    assert pattern in ("in-place", "disjoint")
    return slots_in(SEQ_BLOCKS, old), slots_in(blocks, new), new - old


def reference(layers, src, dst, delta, rope):
    """Copies of the layers after the compaction, by the layer-at-a-time reference."""
    layout = GpuFlashLayout()
    out = [kv.clone() for kv in layers]
    for before, after in zip(layers, out):
        k, v = layout.read(before, src)
        if rope is not None:
            k = rotate_keys(k, delta.to(k.device), rope.inv_freq, rope.rotary_dim, rope.is_neox)
        layout.write(after, dst, k, v)
    return out


def run(impl, layers, src, dst, delta, rope):
    s, d, dl = kept_token_moves(src, dst, delta, rope)
    assert compact_layers(layers, s, d, dl, rope, impl=impl) == impl


def bits(x):
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def interpreted_bf16(impl, dtype, device):
    """Triton's interpreter casts fp32 -> bf16 by truncation (compiled Triton rounds to even)."""
    return impl == "triton" and device == "cpu" and dtype == torch.bfloat16


def exact_rotation(k, delta, rotary_dim, is_neox):
    """k [T, H, D] rotated by delta in float64 (pairs as the model's RoPE pairs them)."""
    k = k.double().clone()
    ang = delta.double().to(k.device)[:, None] * inv_freq(rotary_dim).to(k.device)[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    half = rotary_dim // 2
    i1 = torch.arange(half) if is_neox else torch.arange(0, rotary_dim, 2)
    i2 = i1 + half if is_neox else i1 + 1
    a, b = k[..., i1].clone(), k[..., i2].clone()
    k[..., i1], k[..., i2] = a * cos - b * sin, b * cos + a * sin
    return k


def ulp(x, dtype):
    finfo = torch.finfo(dtype)
    mag = x.abs().clamp_min(finfo.tiny)
    return finfo.eps * torch.exp2(torch.floor(torch.log2(mag)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, dtype, rope_name, device):
    """In-place compaction, LBNHC layers: bit for bit the reference (fp32, fp16, bf16)."""
    rope = spec(*ROPES[rope_name])
    layers = make_layers("lbnhc", dtype, device)
    src, dst, delta = moves("in-place")
    expect = reference(layers, src, dst, delta, rope)
    originals = [kv.clone() for kv in layers]

    run(impl, layers, src, dst, delta, rope)

    layout = GpuFlashLayout()
    for got, want, before in zip(layers, expect, originals):
        if interpreted_bf16(impl, dtype, device):
            assert (got.float() - want.float()).abs().le(ulp(want.float(), dtype)).all()
        else:
            assert torch.equal(bits(got), bits(want))
        k_got, v_got = layout.read(got, dst)
        k_old, v_old = layout.read(before, src)
        assert torch.equal(bits(v_got), bits(v_old))  # values: copied
        assert torch.equal(bits(k_got[:4]), bits(k_old[:4]))  # sinks, Δ = 0: bit for bit
        assert torch.equal(bits(k_got[..., rope.rotary_dim:D]), bits(k_old[..., rope.rotary_dim:D]))
        # within the dtype's rounding (one ulp) of the exact rotation of the stored keys,
        # plus what fp32 angles cost (test_kv's tolerance)
        exact = exact_rotation(k_old, delta, rope.rotary_dim, rope.is_neox)
        rounding = 0.0 if dtype == torch.float32 else ulp(exact, dtype)
        assert (k_got.double() - exact).abs().le(rounding + 3e-5).all()
        assert not torch.equal(k_got[4:], k_old[4:])  # the moved keys did rotate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", ["disjoint", "in-place", "shift-right", "cycle"])
@pytest.mark.parametrize("impl", IMPLS)
def test_overlapping_source_and_destination(impl, pattern, device):
    """Every layer is read before it is written, whatever the overlap (fp32: exact)."""
    rope = spec(D, True)
    layers = make_layers("separate", torch.float32, device, seed=3)
    src, dst, delta = moves(pattern)
    if pattern != "disjoint":
        assert torch.isin(src, dst).any()
    expect = reference(layers, src, dst, delta, rope)
    run(impl, layers, src, dst, delta, rope)
    for got, want in zip(layers, expect):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", ["separate", "one-storage", "lbnhc"])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_storage(impl, storage, device):
    """Separate tensors, views of one storage, permuted strides: same result; other slots untouched."""
    rope = spec(D // 2, False)
    layers = make_layers(storage, torch.float32, device, seed=4)
    src, dst, delta = moves("disjoint")
    expect = reference(layers, src, dst, delta, rope)
    run(impl, layers, src, dst, delta, rope)
    for got, want in zip(layers, expect):
        assert torch.equal(got, want)
    if storage == "one-storage":
        assert layers[0].untyped_storage().data_ptr() == layers[1].untyped_storage().data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_delta_zero_copies_bits(impl, device):
    """Δ = 0 keys keep -0.0 and NaN payloads (x·cos − y·sin with cos = 1, sin = 0 would not)."""
    rope = spec(D, True)
    layers = make_layers("separate", torch.float16, device, seed=5)
    src = slots_in(SEQ_BLOCKS, torch.arange(8))
    dst = slots_in(NEW_BLOCKS, torch.arange(8))
    delta = torch.tensor([0, 0, 0, 0, -3, -3, 2, 2])
    special = torch.tensor([-0.0, float("nan"), 1.0, -2.0], dtype=torch.float16)
    for kv in layers:
        k, v = GpuFlashLayout().read(kv, src)
        k[:4, :, :] = special.repeat(D // 4).to(device)
        k[:4, :, D // 2:] = -0.0  # the second halves of the pairs
        GpuFlashLayout().write(kv, src, k, v)
    before = [GpuFlashLayout().read(kv, src)[0][:4].clone() for kv in layers]
    run(impl, layers, src, dst, delta, rope)
    for kv, want in zip(layers, before):
        assert torch.equal(bits(GpuFlashLayout().read(kv, dst)[0][:4]), bits(want))


def test_kept_token_moves_drops_tokens_that_stay():
    """A token already in its slot at its position is not rewritten (a shared prefix block)."""
    src, dst, delta = kept_token_moves([0, 1, 2, 40], [0, 1, 3, 41], [0, 5, 0, 1], spec(D, True))
    assert src.tolist() == [1, 2, 40] and dst.tolist() == [1, 3, 41] and delta.tolist() == [5, 0, 1]
    with pytest.raises(ValueError):
        kept_token_moves([0, 1], [2, 2], None, None)  # destinations must be distinct
    with pytest.raises(ValueError):
        kept_token_moves([0, 1], [2, 3], [0, 1], None)  # a rotation needs a RopeSpec


def test_select_impl_auto(monkeypatch):
    """Auto: Triton on CUDA layers of one shape and strides, torch otherwise; bad names refused."""
    monkeypatch.delenv(IMPL_ENV, raising=False)
    layers = make_layers("separate", torch.float32, "cpu")
    assert select_impl(layers) == "torch"
    mixed = layers[:1] + make_layers("lbnhc", torch.float32, "cpu")[:1]  # different strides
    monkeypatch.setenv(IMPL_ENV, "auto")
    assert select_impl(mixed) == "torch"
    with pytest.raises(ValueError):
        select_impl(layers, "cuda-graphs")
    if torch.cuda.is_available():
        assert select_impl(make_layers("lbnhc", torch.float16, "cuda")) == "triton"


@needs_triton
def test_select_impl_forced(monkeypatch):
    """The argument, else $SIR_VLLM_COMPACT_IMPL, forces a path (Triton on CPU: the interpreter)."""
    monkeypatch.delenv(IMPL_ENV, raising=False)
    layers = make_layers("separate", torch.float32, "cpu")
    assert select_impl(layers, "triton") == "triton"
    monkeypatch.setenv(IMPL_ENV, "triton")
    assert select_impl(layers) == "triton"
    assert select_impl(layers, "torch") == "torch"  # the argument wins over the environment
    mixed = layers[:1] + make_layers("lbnhc", torch.float32, "cpu")[:1]
    with pytest.raises(ValueError):  # one launch needs one shape and one set of strides
        select_impl(mixed)


class RecordingLayout(KVLayout):
    """A non-GPU layout: must go through read/write, layer by layer."""

    def __init__(self):
        self.inner, self.calls = GpuFlashLayout(), []

    def read(self, kv_layer, slots):
        self.calls.append("read")
        return self.inner.read(kv_layer, slots)

    def write(self, kv_layer, slots, k, v):
        self.calls.append("write")
        self.inner.write(kv_layer, slots, k, v)


@pytest.mark.parametrize("impl", [None, pytest.param("triton", marks=needs_triton)])
def test_copy_kept_tokens_dispatches_by_layout(impl, monkeypatch):
    monkeypatch.delenv(IMPL_ENV, raising=False)
    rope = spec(D, True)
    src, dst, delta = moves("in-place")
    fused_layers = make_layers("lbnhc", torch.float32, "cpu", seed=6)
    paged_layers = [kv.clone() for kv in fused_layers]
    expect = reference(fused_layers, src, dst, delta, rope)
    caches = {f"model.layers.{i}.self_attn.attn": kv for i, kv in enumerate(fused_layers)}
    path = copy_kept_tokens(caches, GpuFlashLayout(), src.tolist(), dst.tolist(), delta.tolist(),
                            rope, impl=impl)
    assert path == (impl or "torch")
    recording = RecordingLayout()
    assert copy_kept_tokens(dict(enumerate(paged_layers)), recording, src, dst, delta, rope) == "layout"
    assert recording.calls == ["read", "write"] * LAYERS
    for a, b, want in zip(fused_layers, paged_layers, expect):
        assert torch.equal(a, want) and torch.equal(b, want)


@needs_triton
def test_worker_uses_fused_path_for_gpu_layout(monkeypatch, caplog):
    """The worker's call site: GPU layout -> the fused path, named in its log line."""
    monkeypatch.setenv(IMPL_ENV, "triton")  # on CPU tensors: the kernel, interpreted
    rope = spec(D, True)
    layers = make_layers("lbnhc", torch.float16, "cpu", seed=7)
    src, dst, delta = moves("disjoint")
    expect = reference(layers, src, dst, delta, rope)
    worker = SessionWorker(vllm_config=None)
    worker.kv_caches = {f"model.layers.{i}.self_attn.attn": kv for i, kv in enumerate(layers)}
    worker.layout, worker._rope = GpuFlashLayout(), rope
    job = SimpleNamespace(req_id="r1", src_slots=src.tolist(), dst_slots=dst.tolist(),
                          delta=delta.tolist())
    with caplog.at_level(logging.INFO, logger="vllm.sir_vllm.connector"):
        worker.start_load_kv(SimpleNamespace(loads=[job]))
    for got, want in zip(layers, expect):
        assert torch.equal(got, want)
    line = caplog.messages[-1]
    rotated = int((delta != 0).sum())
    want = rf"compaction req=r1 tokens=24 rotated={rotated} ms=[\d.]+ path=triton"
    assert re.search(want, line), line


# --- the compiled kernel, without a GPU: Triton's CUDA compiler and ptxas ----------

def compile_for_sm90(dtype, aligned, rotary_dim=128, is_neox=True):
    """PTX of the kernel for a head_dim-128 layer, as the launcher would specialize it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(triton_compact.compact_rows_kernel)
    signature = {"src_layers": "*i64", "dst_layers": "*i64", "src_rows": "*i64", "dst_rows": "*i64",
                 "deltas": "*i64", "cos": "*fp32", "sin": "*fp32", "num_tokens": "i32",
                 "src_head_stride": "i32", "dst_head_stride": "i32"}
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    half = rotary_dim // 2
    constants = dict(DTYPE=triton_compact._tl_dtype(dtype), HEADS=8, HEAD_GROUP=2,
                     ROT_HALF=half, HALF_P=triton.next_power_of_2(max(half, 1)),
                     PAIR_STRIDE=1 if is_neox else 2, PAIR_OFFSET=half if is_neox else 1,
                     REST_START=rotary_dim, REST=256 - rotary_dim,
                     REST_P=triton.next_power_of_2(256 - rotary_dim),
                     BLOCK_T=triton_compact.BLOCK_T, ALIGN=vec if aligned else 1)
    signature.update({name: "constexpr" for name in constants})
    # what the launcher's specialization gives: 16-aligned pointers, strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": triton_compact.NUM_WARPS, "enable_fp_fusion": False})
    return kernel.asm["ptx"]


@pytest.fixture(scope="module")
def cuda_compiler():
    try:
        compile_for_sm90(torch.float16, True)
    except Exception as e:  # no Triton, or no NVIDIA backend / ptxas in this build
        pytest.skip(f"Triton cannot compile for sm_90 here: {e}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_kernel_compiles_for_h100_class_gpus(cuda_compiler, dtype):
    """Aligned rows: 16-byte vector loads and stores; no FMA, so fp32 matches torch bit for bit."""
    ptx = compile_for_sm90(dtype, aligned=True)
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx
    assert not re.search(r"\bfma\.", ptx)
    scalar = compile_for_sm90(dtype, aligned=False)  # unaligned fallback still compiles
    assert "st.global.v4" not in scalar


@pytest.mark.parametrize("rotary_dim,is_neox", [(64, False), (96, True), (0, True)],
                         ids=["gptj-partial", "neox-96", "copy-only"])
def test_kernel_variants_compile(cuda_compiler, rotary_dim, is_neox):
    """GPT-J pairs, a rotary_dim that is not a power of two, the staging copy (no rotation)."""
    ptx = compile_for_sm90(torch.float16, True, rotary_dim, is_neox)
    assert "st.global.v4" in ptx and not re.search(r"\bfma\.", ptx)
    assert ("mul.rn.f32" in ptx or "mul.f32" in ptx) == (rotary_dim > 0)  # the copy computes nothing


# --- the micro-benchmark ------------------------------------------------------------

@pytest.mark.parametrize("in_place", [False, True])
def test_bench_counts_read_and_write_of_every_moved_token(in_place):
    cfg = CompactionBenchConfig(layers=3, kv_heads=2, head_dim=32, tokens=40, sinks=4, history=100,
                                block_size=16, in_place=in_place, dtype="bfloat16")
    case = build_case(cfg, torch.device("cpu"))
    # in place, the sinks already sit in their slots at their positions: nothing to move
    moved = 40 - 4 if in_place else 40
    assert case.moved_tokens == moved
    assert case.bytes_moved == 2 * 3 * moved * 2 * (2 * 32) * 2  # r+w, layers, tokens, heads, K|V, bf16
    assert len(set(case.dst)) == 40
    assert bool(set(case.src) & set(case.dst)) == in_place  # new blocks, or the session's own


@needs_triton
def test_bench_command_runs_without_vllm(tmp_path):
    """`sir-vllm bench-compaction` on tiny shapes: both paths, checked, JSON written, no vLLM import."""
    out = tmp_path / "bench.json"
    args = ["bench-compaction", "--device", "cpu", "--impl", "torch,triton", "--layers", "2",
            "--kv-heads", "2", "--head-dim", "32", "--tokens", "24", "--history", "64",
            "--iters", "1", "--warmup", "0", "--json", str(out)]
    code = ("import sys; from sir_vllm.cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'vllm' not in sys.modules, 'vllm was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/3] copy baseline" in proc.stdout and "of copy" in proc.stdout
    result = json.loads(out.read_text())
    assert result["vllm_imported"] is False
    assert result["bytes_per_compaction"] == 2 * 2 * 24 * 2 * 64 * 2
    assert [(r["impl"], r["path"]) for r in result["rows"]] == [("torch", "call"), ("triton", "call")]
    for row in result["rows"]:
        assert row["of_copy"] == pytest.approx(row["gb_per_s"] / result["copy"]["gb_per_s"])
    assert all(c["bit_exact"] for c in result["checks"].values()) and set(result["checks"]) == {
        "torch", "triton"}
    assert "goal" not in result  # the goal is the compiled kernel's, on a GPU
