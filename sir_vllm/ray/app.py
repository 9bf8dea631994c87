"""The one builder: `sir-vllm serve-ray` and `serve run CONFIG.yaml` both call `build_app`.

    applications:
      - name: sir-vllm
        route_prefix: /
        import_path: sir_vllm.ray.app:build_app
        args: {model: MODEL, vllm_args: "--kv-policy sirllm ..."}
        deployments: [{name: sir-vllm, num_replicas: 2}]

The vllm serve flags are parsed here, once, by vLLM's parser and checked
(`options.check_for_ray`); the parsed Namespace goes to every replica. The
deployment is its own ingress with the session-affine request router. The
replica count is Serve's `num_replicas`, so changing it in the config is an
in-place update: running replicas, and the sessions they hold, stay.
"""

from __future__ import annotations

from sir_vllm.ray.options import RayServeOptions, check_for_ray, parse_vllm_args, session_ttl_s


def cluster_nodes() -> int | None:
    """Alive nodes of the Ray cluster this driver is connected to (None: not connected)."""
    import ray

    if not ray.is_initialized():
        return None
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def router_config(args):
    from ray.serve.config import RequestRouterConfig

    from sir_vllm.ray.router import ROUTER_PATH

    kwargs = {}
    ttl = session_ttl_s(args)
    if ttl is not None:
        kwargs["session_ttl_s"] = float(ttl)
    return RequestRouterConfig(request_router_class=ROUTER_PATH, request_router_kwargs=kwargs)


def deployment_options(opts: RayServeOptions, args) -> dict:
    actor = {"num_cpus": opts.replica_cpus}
    if opts.replica_gpus:
        actor["num_gpus"] = opts.replica_gpus
    return {  # num_replicas: the config's (deployments: [{name, num_replicas}]), a lightweight update
        "name": opts.name,
        "max_ongoing_requests": opts.max_ongoing_requests,
        "ray_actor_options": actor,
        "request_router_config": router_config(args),
    }


def build_deployment(opts: RayServeOptions, nodes: int | None = None):
    """The bound application for these options; raises RayOptionError."""
    from ray import serve

    from sir_vllm.ray.replica import SirVllmServer

    args = parse_vllm_args(opts)
    check_for_ray(args, nodes=nodes)
    server = serve.deployment(serve.ingress()(SirVllmServer), **deployment_options(opts, args))
    return server.bind(args)


def build_app(args: dict):
    """Ray Serve application builder (`import_path: sir_vllm.ray.app:build_app`)."""
    return build_deployment(RayServeOptions.from_dict(args), cluster_nodes())
