"""Micro-benchmark of the worker's compaction: achieved bytes/s against a plain copy.

One compaction moves T kept tokens of every layer: it reads and writes each
token's K and V rows (2 · layers · T · kv_heads · 2·head_dim · element size
bytes; staging for overlapping slots is extra traffic, not counted). The
yardstick is the same device copying the same number of bytes with a plain
`Tensor.copy_`, measured in the same run. Timed paths:

  kernel  the fused Triton launches alone, arguments prepared (CUDA only)
  call    `copy_kept_tokens` as the worker calls it: Python lists in, host-side
          checks, index upload, angles, launches

Needs torch (and triton for the Triton path); never imports vLLM.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GOAL = 0.70  # of the copy bandwidth, for the Triton kernel on a GPU


@dataclass
class CompactionBenchConfig:
    """The cache and keep set; defaults: a Llama-3-8B-shaped cache, 1K kept tokens."""

    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    rotary_dim: int | None = None      # None: head_dim
    gptj: bool = False                 # GPT-J pairing instead of neox
    dtype: str = "float16"
    block_size: int = 16
    tokens: int = 1024                 # the keep set
    sinks: int = 4                     # of which the first ones stay at positions 0..sinks-1
    history: int = 2048                # positions the keep set is drawn from
    in_place: bool = False             # compact inside the session's own blocks (overlap)
    device: str = "auto"
    impls: list[str] = field(default_factory=list)   # empty: triton + torch on CUDA, torch on CPU
    block_t: list[int] = field(default_factory=list)  # Triton tokens per program; empty: default
    head_group: list[int] = field(default_factory=list)  # Triton kv heads per program
    num_warps: list[int] = field(default_factory=list)
    iters: int | None = None           # None: 50 on CUDA, 5 on CPU
    warmup: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.tokens <= self.history:
            raise ValueError(f"--tokens must be in 1..--history ({self.history}), got {self.tokens}")
        if any(self.kv_heads % g for g in self.head_group):
            raise ValueError(f"--head-group values must divide --kv-heads ({self.kv_heads})")
        if not 0 <= self.sinks <= self.tokens:
            raise ValueError(f"--sinks must be in 0..--tokens, got {self.sinks}")
        rot = self.rotary_dim or self.head_dim
        if rot % 2 or rot > self.head_dim:
            raise ValueError(f"--rotary-dim must be even and <= --head-dim, got {rot}")
        for impl in self.impls:
            if impl not in ("torch", "triton"):
                raise ValueError(f"--impl takes torch and/or triton, got {impl!r}")


@dataclass
class Case:
    """A filled cache and one compaction plan over it."""

    layers: list[torch.Tensor]
    src: list[int]
    dst: list[int]
    delta: list[int]
    rope: object
    moved_tokens: int       # tokens actually read and written (those that move or rotate)
    bytes_moved: int        # read + write of K and V of moved tokens, every layer
    pool_blocks: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    return device


def build_case(cfg: CompactionBenchConfig, device: torch.device) -> Case:
    """FlashAttention-ordered layers ([blocks, block_size, heads, 2D] memory), separate tensors.

    The session's history occupies random blocks; the keep set is `sinks`
    tokens at 0.. plus tokens drawn from the rest, compacted to positions
    0..T-1 in the new request's blocks (or, in place, the session's own).
    """
    from sir_vllm.kv import RopeSpec
    from sir_vllm.kv.compact import kept_token_moves

    g = torch.Generator().manual_seed(cfg.seed)
    bs = cfg.block_size
    hist_blocks, keep_blocks = -(-cfg.history // bs), -(-cfg.tokens // bs)
    pool_blocks = hist_blocks + (0 if cfg.in_place else keep_blocks)
    pool_blocks += max(2, pool_blocks // 8)  # spare blocks no one touches
    order = torch.randperm(pool_blocks, generator=g)
    old_table, new_table = order[:hist_blocks], order[hist_blocks:hist_blocks + keep_blocks]
    if cfg.in_place:
        new_table = old_table
    rest = torch.randperm(cfg.history - cfg.sinks, generator=g)[: cfg.tokens - cfg.sinks] + cfg.sinks
    old = torch.cat([torch.arange(cfg.sinks), rest.sort().values])
    new = torch.arange(cfg.tokens)

    def slots(table, pos):
        return (table[pos // bs] * bs + pos % bs).tolist()

    rot = cfg.rotary_dim or cfg.head_dim
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)  # Llama 3's base
    rope = RopeSpec(inv_freq.to(torch.float32), rot, not cfg.gptj)
    dtype = DTYPES[cfg.dtype]
    layers = []
    for _ in range(cfg.layers):
        phys = torch.empty(pool_blocks, bs, cfg.kv_heads, 2 * cfg.head_dim, dtype=dtype, device=device)
        phys.normal_()
        layers.append(phys.permute(0, 2, 1, 3))  # logical [blocks, heads, block_size, 2D]
    src, dst, delta = slots(old_table, old), slots(new_table, new), (new - old).tolist()
    moved = kept_token_moves(src, dst, delta, rope)[0].numel()
    esize = torch.empty((), dtype=dtype).element_size()
    nbytes = 2 * cfg.layers * moved * cfg.kv_heads * 2 * cfg.head_dim * esize
    return Case(layers, src, dst, delta, rope, moved, nbytes, pool_blocks)


def seconds_per_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """CUDA: back-to-back calls between two events (the GPU's throughput); CPU: the median call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_result(cfg: CompactionBenchConfig, device: torch.device, impl: str) -> dict:
    """One compaction on a fresh cache, layers 0, middle, last against the layer-at-a-time reference."""
    from sir_vllm.kv import GpuFlashLayout, copy_kept_tokens, rotate_keys

    case = build_case(cfg, device)
    picked = sorted({0, cfg.layers // 2, cfg.layers - 1})
    before = [case.layers[i].clone() for i in picked]
    copy_kept_tokens(dict(enumerate(case.layers)), GpuFlashLayout(), case.src, case.dst, case.delta,
                     case.rope, impl=impl)
    layout, rope = GpuFlashLayout(), case.rope
    src, dst = torch.tensor(case.src), torch.tensor(case.dst)
    delta = torch.tensor(case.delta, device=device)
    worst, exact = 0.0, True
    for i, old in zip(picked, before):
        k, v = layout.read(old, src)
        want_k = rotate_keys(k, delta, rope.inv_freq, rope.rotary_dim, rope.is_neox)
        got_k, got_v = layout.read(case.layers[i], dst)
        exact &= torch.equal(got_k, want_k) and torch.equal(got_v, v)
        worst = max(worst, float((got_k.float() - want_k.float()).abs().max()))
    return {"layers_checked": picked, "bit_exact": bool(exact), "max_abs_diff": worst,
            "interpreted": impl == "triton" and device.type != "cuda"}


def measure(cfg: CompactionBenchConfig, device: torch.device, impls: list[str], iters: int,
            warmup: int, out: Callable[[str], None]) -> tuple[int, dict, list[dict]]:
    """(bytes per compaction, the copy baseline, a row per timed path), with progress lines."""
    from sir_vllm.kv import GpuFlashLayout, copy_kept_tokens, triton_compact
    from sir_vllm.kv.compact import kept_token_moves

    case = build_case(cfg, device)
    mb = case.bytes_moved / 1e6
    pool_mb = sum(kv.numel() * kv.element_size() for kv in case.layers) / 1e6
    out(f"  cache: {cfg.layers} layers x {cfg.kv_heads} kv heads x head_dim {cfg.head_dim} "
        f"(rotary {case.rope.rotary_dim}, {'GPT-J' if cfg.gptj else 'neox'}), {cfg.dtype}, "
        f"block {cfg.block_size}, {case.pool_blocks} blocks ({pool_mb:.0f} MB)")
    out(f"  keep set: {cfg.tokens} tokens ({cfg.sinks} sinks) of {cfg.history}, "
        f"{'in place' if cfg.in_place else 'into new blocks'}; {case.moved_tokens} move: "
        f"{mb:.1f} MB read + written per compaction; {iters} timed calls after {warmup} warm-up")
    tunings = _tunings(cfg) if "triton" in impls and device.type == "cuda" else []
    steps, step, rows = 1 + len(tunings) + len(impls), 0, []

    def timed(what, fn) -> float:
        nonlocal step
        step += 1
        out(f"  [{step}/{steps}] {what} ...")
        sec = seconds_per_call(fn, device, iters, warmup)
        out(f"        {sec * 1e3:.3f} ms, {case.bytes_moved / sec / 1e9:.1f} GB/s")
        return sec

    def row(impl, path, sec, **extra):
        gbs = case.bytes_moved / sec / 1e9
        rows.append({"impl": impl, "path": path, "ms": sec * 1e3, "gb_per_s": gbs,
                     "of_copy": gbs / copy["gb_per_s"], **extra})

    first = case.layers[0]
    src = torch.empty(case.bytes_moved // 2 // first.element_size(), dtype=first.dtype,
                      device=device).normal_()
    dst = torch.empty_like(src)
    sec = timed(f"copy baseline (Tensor.copy_ of {mb:.1f} MB in all)", lambda: dst.copy_(src))
    copy = {"ms": sec * 1e3, "gb_per_s": case.bytes_moved / sec / 1e9}

    moves = kept_token_moves(case.src, case.dst, case.delta, case.rope)
    for tuning in tunings:
        plan = triton_compact.TritonCompaction(case.layers, *moves, case.rope, **tuning)
        row("triton", "kernel", timed(f"triton kernel {tuning}", plan.run),
            launches=len(plan.launches), **tuning)
    caches = dict(enumerate(case.layers))
    for impl in impls:
        row(impl, "call", timed(f"{impl} call", lambda impl=impl: copy_kept_tokens(
            caches, GpuFlashLayout(), case.src, case.dst, case.delta, case.rope, impl=impl)))
    return case.bytes_moved, copy, rows


def run_compaction_bench(cfg: CompactionBenchConfig, out: Callable[[str], None] = print) -> dict:
    """Measure, check each path, print a summary, return the results (JSON-ready)."""
    from sir_vllm.kv import triton_compact

    cfg.validate()
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    impls = cfg.impls or (["triton", "torch"] if cuda and triton_compact.available() else ["torch"])
    iters = cfg.iters or (50 if cuda else 5)
    warmup = cfg.warmup if cfg.warmup is not None else (10 if cuda else 1)
    out(f"sir-vllm bench-compaction on {device_name(device)}")
    nbytes, copy, rows = measure(cfg, device, impls, iters, warmup, out)
    checks = {}
    for impl in impls:
        out(f"  checking {impl} against the reference (fresh cache) ...")
        checks[impl] = check_result(cfg, device, impl)
    result = {
        "device": device_name(device), "config": asdict(cfg), "bytes_per_compaction": nbytes,
        "copy": copy, "rows": rows, "checks": checks,
        "vllm_imported": "vllm" in sys.modules, "torch": torch.__version__,
        "triton": getattr(triton_compact.triton, "__version__", None),
    }
    kernel = [r for r in rows if r["impl"] == "triton" and r["path"] == "kernel"]
    if kernel:
        best = max(kernel, key=lambda r: r["of_copy"])
        result["goal"] = {"target_of_copy": GOAL, "best_kernel_of_copy": best["of_copy"],
                          "met": best["of_copy"] >= GOAL,
                          "best_tuning": {k: best[k] for k in ("block_t", "head_group", "num_warps")}}
    out(summary(result))
    return result


def _tunings(cfg: CompactionBenchConfig) -> list[dict]:
    from sir_vllm.kv import triton_compact

    return [{"block_t": b, "head_group": g, "num_warps": w}
            for b in (cfg.block_t or [triton_compact.BLOCK_T])
            for g in (cfg.head_group or [triton_compact.HEAD_GROUP])
            for w in (cfg.num_warps or [triton_compact.NUM_WARPS])]


def summary(result: dict) -> str:
    lines = ["", f"{'impl':<8} {'path':<8} {'tuning':<14} {'ms':>9} {'GB/s':>8} {'of copy':>8}",
             f"{'copy':<8} {'copy_':<8} {'':<14} {result['copy']['ms']:>9.3f} "
             f"{result['copy']['gb_per_s']:>8.1f} {'100%':>8}"]
    for r in result["rows"]:
        tuning = f"T{r['block_t']} h{r['head_group']} w{r['num_warps']}" if "block_t" in r else ""
        lines.append(f"{r['impl']:<8} {r['path']:<8} {tuning:<14} {r['ms']:>9.3f} "
                     f"{r['gb_per_s']:>8.1f} {r['of_copy']:>8.0%}")
    for impl, c in result["checks"].items():
        lines.append(f"check {impl}: layers {c['layers_checked']} "
                     f"{'bit for bit the reference' if c['bit_exact'] else 'DIFFER'} "
                     f"(max |diff| {c['max_abs_diff']:.3g})"
                     + (" [Triton's interpreter truncates fp32 -> bf16; compiled code rounds]"
                        if c["interpreted"] and result["config"]["dtype"] == "bfloat16" else ""))
    goal = result.get("goal")
    if goal:
        lines.append(f"goal: Triton kernel >= {goal['target_of_copy']:.0%} of the copy bandwidth: "
                     f"{goal['best_kernel_of_copy']:.0%} ({'met' if goal['met'] else 'NOT met'}, "
                     f"best {goal['best_tuning']})")
    lines.append(f"vLLM imported: {'yes' if result['vllm_imported'] else 'no'}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
