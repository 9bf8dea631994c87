"""The `vllm.general_plugins` entry point of sir-vllm.

vLLM calls `register()` in every process it starts (API server, EngineCore,
workers) and again inside `AsyncEngineArgs.add_cli_args`. It must therefore be
cheap and safe to call many times. In the process that parses the command line
it adds `--kv-policy` and its knobs to the engine arguments (see
`sir_vllm.server.flags`); in engine-side processes it starts a watch that ends
them when their parent dies (see `sir_vllm.server.parent_watch`).
"""

from __future__ import annotations

import multiprocessing
import os

PROBE_ENV = "SIR_VLLM_PLUGIN_PROBE"

_registered = False


def _record_probe() -> None:
    """Append `pid<TAB>process-name` to $SIR_VLLM_PLUGIN_PROBE, so tests can see
    which vLLM processes loaded the plugin."""
    path = os.environ.get(PROBE_ENV)
    if not path:
        return
    name = multiprocessing.current_process().name
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\t{name}\n")


def _install_flags() -> None:
    from sir_vllm import vllm_adapter
    from sir_vllm.server.flags import add_kv_policy_args, apply_kv_policy_args

    vllm_adapter.wrap_engine_cli(add_kv_policy_args, apply_kv_policy_args)


def _watch_parent() -> None:
    from sir_vllm.server import parent_watch

    parent_watch.start()


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _record_probe()
    _watch_parent()  # first: a failure below must not leave an engine unwatched
    _install_flags()
