"""The builder's arguments: the `vllm serve` flags, parsed once, and what Ray adds.

The flags are parsed by vLLM's own `vllm serve` parser (the plugin adds the
SirLLM group to it) into one Namespace, validated here with the same checks
`vllm serve --kv-policy ...` runs, and handed as is to every replica, which
applies them with the same code (`server.flags.apply_kv_policy_args`).
What `vllm serve` cannot mean under Ray is refused with the reason: several
API processes in a replica, data parallelism, and a session store the
replicas cannot share.

Session store under Ray: a session that moves (its replica died or was
scaled in) continues from the store, so every replica must reach the same
one. Not given, it is the `vllm serve` default, SQLite in a file under
`~/.cache/sir-vllm/`, which the replicas of one host share; a cluster of
several nodes needs `redis://HOST:PORT/DB` and is refused without it.
"""

from __future__ import annotations

import copy
import os
import shlex
from dataclasses import dataclass, fields

from sir_vllm import vllm_adapter
from sir_vllm.server import flags

PROG = "sir-vllm serve-ray"
# vLLM queues and batches requests itself; Serve's own cap would only hold them in
# the proxy (Ray Serve LLM uses the same: RAY_SERVE_LLM_DEFAULT_MAX_ONGOING_REQUESTS).
MAX_ONGOING_REQUESTS = 1_000_000_000


class RayOptionError(ValueError):
    """A flag or option Ray cannot serve, with the reason and the fix."""


@dataclass(frozen=True)
class RayServeOptions:
    """What the builder takes (`args:` of a Serve config file; the command's flags)."""

    model: str
    vllm_args: tuple[str, ...] = ()  # `vllm serve` flags after MODEL (--host/--port: http_options)
    replica_cpus: float = 1.0  # Ray's logical CPUs reserved per replica (scheduling only)
    replica_gpus: float = 0.0  # GPUs per replica: tensor_parallel_size x pipeline_parallel_size
    max_ongoing_requests: int = MAX_ONGOING_REQUESTS
    name: str = "sir-vllm"  # the deployment's name

    @classmethod
    def from_dict(cls, raw: dict) -> "RayServeOptions":
        """From a Serve config file's `args:` (vllm_args: a list or one shell-quoted string)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RayOptionError(f"unknown argument(s) {', '.join(unknown)}; the builder takes "
                                 f"{', '.join(sorted(known))}")
        if "model" not in raw:
            raise RayOptionError("model: required (the folder or name `vllm serve MODEL` takes)")
        values = dict(raw)
        values["model"] = os.path.expanduser(str(values["model"]))  # config files: ~/...
        argv = values.get("vllm_args", ())
        values["vllm_args"] = tuple(shlex.split(argv) if isinstance(argv, str) else map(str, argv))
        return cls(**values)

    def to_dict(self) -> dict:
        """The config file's `args:` for these options (defaults left out)."""
        out = {"model": self.model, "vllm_args": shlex.join(self.vllm_args)}
        for f in fields(self):
            if f.name not in out and getattr(self, f.name) != f.default:
                out[f.name] = getattr(self, f.name)
        return out


def parse_vllm_args(opts: RayServeOptions):
    """The Namespace `vllm serve MODEL FLAGS` parses to (exits 2 on a bad flag, as it does)."""
    return vllm_adapter.parse_serve_args([opts.model, *opts.vllm_args], prog=PROG)


def store_of(args) -> str | None:
    return getattr(args, flags.setting_dest("--kv-session-store"), None)


def check_for_ray(args, nodes: int | None = None, replicas: int | None = None) -> None:
    """Refuse what these flags cannot mean under Ray; `nodes`: the cluster's alive
    nodes, `replicas`: the deployment's, when known. Runs the `vllm serve
    --kv-policy` checks first (on a copy: the replicas apply the flags
    themselves). Raises RayOptionError."""
    from sir_vllm.sessions.store import store_kind

    count = getattr(args, "api_server_count", None)
    if count is not None and count > 1:
        raise RayOptionError(f"--api-server-count {count}: a replica is one API server under Ray; "
                             "scale with replicas (--replicas, or num_replicas in the config)")
    if getattr(args, "headless", False):
        raise RayOptionError("--headless: a replica serves HTTP; drop --headless")
    dp = getattr(args, "data_parallel_size", 1) or 1
    if dp > 1:
        raise RayOptionError(f"--data-parallel-size {dp}: each replica is one engine under Ray; "
                             f"use {dp} replicas (--replicas, or num_replicas in the config)")
    check_ray_workers(args)
    probe = copy.deepcopy(args)
    try:
        policy = flags.policy_from_args(probe)
        if policy is None:
            return  # stock vLLM on every replica: no sessions to share
        flags.session_settings_from_args(probe, policy)
        flags.chat_template_from_args(probe)
        flags.check_serving(probe)
    except flags.FlagError as e:
        raise RayOptionError(str(e)) from None
    check_replica_count(args, replicas)
    store = store_of(args)
    kind = store_kind(store)
    if kind == "sqlite" and nodes is not None and nodes > 1:
        given = f"--kv-session-store {store}" if store else "the default store (sqlite)"
        raise RayOptionError(
            f"{given}: the Ray cluster has {nodes} nodes, and a SQLite file is shared only by the "
            "replicas of one host; use --kv-session-store redis://HOST:PORT/DB")


def check_ray_workers(args) -> None:
    """Ray-placed engine workers where the platform cannot run them (vLLM's CPU
    build): refused here, with the fix, rather than in every replica's engine start."""
    asked = [flag for flag, dest in (("--distributed-executor-backend", "distributed_executor_backend"),
                                     ("--data-parallel-backend", "data_parallel_backend"))
             if getattr(args, dest, None) == "ray"]
    if asked and not vllm_adapter.platform_runs_ray_workers():
        raise RayOptionError(
            f"{' and '.join(asked)} ray: this vLLM build's platform does not run engine workers on "
            "Ray (vLLM's CPU platform refuses it); each replica runs its engine as `vllm serve` "
            "does: drop it, or use --distributed-executor-backend mp for tensor parallel")


def check_replica_count(args, replicas: int | None) -> None:
    """A store inside each replica cannot serve several: a session that moves
    would lose its memory. Checked by the command (--replicas) and by each
    replica at start (Serve's world size), so scaling up a memory-store app fails too."""
    from sir_vllm.sessions.store import store_kind

    if replicas is not None and replicas > 1 and getattr(args, "kv_policy", "none") != "none" \
            and store_kind(store_of(args)) == "memory":
        raise RayOptionError(
            f"--kv-session-store memory with {replicas} replicas: each replica would keep its "
            "own sessions, and a session that moves (its replica died or was scaled in) would lose "
            "its memory; use sqlite (the default: shared by the replicas of one host) or "
            "redis://HOST:PORT/DB (any number of hosts)")


def session_ttl_s(args) -> float | None:
    """--kv-session-ttl when given (the router forgets sessions the store forgets)."""
    return getattr(args, flags.setting_dest("--kv-session-ttl"), None)
