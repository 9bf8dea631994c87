"""The deployment: in each replica, vLLM's own engine and app, as `vllm serve` builds them.

A replica is its own ingress (`serve.ingress()` with `__serve_build_asgi_app__`):
the proxy hands each HTTP request to vLLM's FastAPI app, session middleware
included, so a replica answers exactly what `vllm serve` answers. Ray Serve
LLM's `OpenAiIngress` has its own app and would bypass the middleware; its
`LLMServer` builds `AsyncEngineArgs(**engine_kwargs)`, which never passes
through `from_cli_args` (where the plugin applies `--kv-policy`) and refuses
our flags. So the replica runs the `vllm serve` code path itself: the
Namespace vLLM's parser made, `apply_kv_policy_args` on it (the same function
the CLI runs), then vLLM's engine start and app build minus uvicorn.

On the CPU the engine runs as `vllm serve` runs it (EngineCore and worker
processes beside the replica; vLLM's CPU platform refuses Ray's executor).
On GPUs the replica's Ray resources hold the devices (`replica_gpus`); vLLM
picks up the replica's placement group when one is given (see the README
section "Scaling out with Ray").
"""

from __future__ import annotations

import contextlib
import logging
import os

from sir_vllm import vllm_adapter

logger = logging.getLogger("ray.serve")

# Read by server/middleware.py for the X-Sir-Replica header of every session response.
REPLICA_ENV = "SIR_VLLM_REPLICA"


def replica_context():
    from ray import serve

    return serve.get_replica_context()


class SirVllmServer:
    """One replica: one vLLM engine and its API app."""

    async def __init__(self, args):
        from sir_vllm.ray.options import RayOptionError, check_replica_count
        from sir_vllm.server import flags

        context = replica_context()
        # Its Serve id (SERVE_REPLICA::app#deployment#id, its actor's name), set
        # before the app and its session middleware exist.
        os.environ[REPLICA_ENV] = context.replica_id.to_full_id_str()
        try:
            check_replica_count(args, context.world_size)  # scaled up on a memory store
        except RayOptionError as e:
            raise RuntimeError(str(e)) from None
        self.args = args
        self._engine_scope = contextlib.AsyncExitStack()
        vllm_adapter.serve_process_setup()
        try:
            flags.apply_kv_policy_args(args)  # what `vllm serve --kv-policy ...` does at start
        except SystemExit:
            raise RuntimeError("the vllm serve flags were refused in this replica; its log has "
                               "the `vllm serve: error:` line") from None
        self.engine = await self._engine_scope.enter_async_context(
            vllm_adapter.serve_engine_client(args))
        logger.info("sir-vllm: replica %s serving %s", os.environ[REPLICA_ENV], args.model)

    async def __serve_build_asgi_app__(self):
        return await vllm_adapter.build_serve_app(self.engine, self.args)

    async def check_health(self) -> None:
        """Serve restarts a replica whose engine died."""
        await self.engine.check_health()

    async def __del__(self):
        await self._engine_scope.aclose()  # stops EngineCore and its workers
