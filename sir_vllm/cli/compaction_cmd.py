"""`sir-vllm bench-compaction`: the worker's KV compaction against a plain copy, on one device."""

from __future__ import annotations

import argparse
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-compaction",
        help="micro-benchmark: compaction (copy + RoPE re-rotation of kept KV) vs a plain copy",
        description=(
            "Time what the worker does when a session's next turn loads its kept tokens: copy each "
            "kept token's K/V from the session's blocks into the new request's, keys re-rotated by "
            "the position delta, for every layer, on a synthetic paged cache (FlashAttention "
            "memory order, one tensor per layer). Bytes counted: read + write of K and V of every "
            "moved token in every layer (staging for overlapping slots is not counted). Yardstick: "
            "Tensor.copy_ of the same number of bytes on the same device, measured in the same "
            "run. On CUDA it reports the fused Triton kernel alone ('kernel', a row per "
            "--block-t/--head-group/--num-warps), and the whole call as the worker makes it "
            "('call': host checks, index upload, launches) for the Triton and torch paths; the "
            "goal is a kernel at >= 70% of the copy bandwidth. On the CPU only the torch path "
            "runs by default (--impl triton there runs Triton's interpreter: use tiny shapes). "
            "Each path is then checked against the layer-at-a-time reference on a fresh cache. "
            "Defaults: a "
            "Llama-3-8B-shaped cache (32 layers, 8 KV heads, head_dim 128, fp16, block 16) and a "
            "1K-token keep set. Does not import vLLM."),
    )
    c = p.add_argument_group("cache")
    c.add_argument("--layers", type=int, default=32, help="[default: 32]")
    c.add_argument("--kv-heads", type=int, default=8, help="[default: 8]")
    c.add_argument("--head-dim", type=int, default=128, help="[default: 128]")
    c.add_argument("--rotary-dim", type=int, default=None, help="[default: --head-dim]")
    c.add_argument("--gptj", action="store_true", help="GPT-J pairing (2i, 2i+1) instead of neox")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="[default: float16]")
    c.add_argument("--block-size", type=int, default=16, help="[default: 16, vLLM's GPU default]")
    k = p.add_argument_group("keep set")
    k.add_argument("--tokens", type=int, default=1024, help="kept tokens [default: 1024]")
    k.add_argument("--sinks", type=int, default=4,
                   help="of which attention sinks, staying at positions 0.. (Δ = 0) [default: 4]")
    k.add_argument("--history", type=int, default=2048,
                   help="positions the keep set is drawn from [default: 2048]")
    k.add_argument("--in-place", action="store_true",
                   help="compact inside the session's own blocks (overlapping slots: staged)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N "
                   "[default: auto]")
    r.add_argument("--impl", default="", help="comma list of triton, torch "
                   "[default: triton,torch on CUDA, torch on the CPU]")
    r.add_argument("--block-t", default="", help="comma list of Triton tokens per program to try "
                   "[default: the kernel's, 16]")
    r.add_argument("--head-group", default="", help="comma list of Triton kv heads per program to "
                   "try, each dividing --kv-heads [default: the kernel's, 1]")
    r.add_argument("--num-warps", default="", help="comma list of Triton num_warps to try "
                   "[default: the kernel's, 4]")
    r.add_argument("--iters", type=int, default=None, help="timed calls [default: 50 CUDA, 5 CPU]")
    r.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first [default: 10 CUDA, 1 CPU]")
    r.add_argument("--seed", type=int, default=0, help="fixes the keep set [default: 0]")
    r.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.compaction import CompactionBenchConfig, run_compaction_bench, write_json

    cfg = CompactionBenchConfig(
        layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
        rotary_dim=args.rotary_dim, gptj=args.gptj, dtype=args.dtype, block_size=args.block_size,
        tokens=args.tokens, sinks=args.sinks, history=args.history, in_place=args.in_place,
        device=args.device, impls=[x for x in args.impl.split(",") if x.strip()],
        block_t=_ints(args.block_t), head_group=_ints(args.head_group), num_warps=_ints(args.num_warps),
        iters=args.iters, warmup=args.warmup, seed=args.seed)
    result = run_compaction_bench(cfg)
    if args.json:
        write_json(result, args.json)
        print(f"results: {args.json}")
    checks_ok = all(c["bit_exact"] for c in result["checks"].values())
    return 0 if checks_ok else 1
