"""`sir-vllm serve-ray MODEL --replicas N [vllm serve flags]`: sir-vllm on Ray Serve.

N replicas, each serving what `vllm serve MODEL [flags]` serves, behind Ray
Serve's HTTP proxy on `--host`/`--port` (vllm serve's defaults: every
interface, port 8000), with the session-affine request router. The flags are
parsed by vLLM's own parser; the command applies the Serve config file that
`--print-config` prints (builder `sir_vllm.ray.app:build_app`; an example is
launch/ray-serve.yaml), as `serve run CONFIG.yaml` would.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

DEFAULT_HOST = "0.0.0.0"  # `vllm serve` without --host binds every interface
DEFAULT_PORT = 8000


def ray_options_parser() -> argparse.ArgumentParser:
    """The options serve-ray adds to `vllm serve`'s (given before or after MODEL)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("Ray")
    g.add_argument("--replicas", type=int, default=1, help="replicas of the engine [default: 1]")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="Ray CPUs each replica reserves (for Ray's scheduling) [default: 1]")
    g.add_argument("--replica-gpus", type=float, default=0.0,
                   help="GPUs each replica reserves: tensor x pipeline parallel size [default: 0]")
    g.add_argument("--ray-address", default=None,
                   help="a running Ray cluster (ray://... or HOST:PORT) [default: RAY_ADDRESS, "
                        "else start a local one for this command]")
    g.add_argument("--print-config", action="store_true",
                   help="print the Serve config file this command applies (for `serve run`) "
                        "and exit")
    return p


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-ray", parents=[ray_options_parser()],
        help="serve MODEL with N Ray Serve replicas, sessions kept on the replica holding them",
        description=(
            "Run N replicas of `vllm serve MODEL [flags]` on Ray Serve behind one HTTP endpoint "
            "(--host, --port). A request with an X-Session-ID header goes to the replica that "
            "holds the session's KV (a new session: the replica with the fewest); one without "
            "goes by load. Sessions live in a store every replica reaches (--kv-session-store: "
            "sqlite on one host, the default; redis://HOST:PORT/DB across hosts), so a session "
            "whose replica died or was scaled in continues on another. Every other flag is "
            "`vllm serve`'s (vllm serve --help)."),
        epilog="Config-file equivalent: `serve run launch/ray-serve.yaml` (the same builder).",
    )
    p.add_argument("model", help="what `vllm serve MODEL` takes")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="`vllm serve` flags")
    p.set_defaults(run=run)


def split_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """serve-ray's own options (before or after MODEL) and the vllm serve flags."""
    given = argparse.Namespace(**{a.dest: getattr(args, a.dest)
                                  for a in ray_options_parser()._actions if a.dest != "help"})
    return ray_options_parser().parse_known_args(args.vllm_args, namespace=given)


def _stop_event() -> threading.Event:
    """Set by SIGTERM or Ctrl-C, so the command always takes its app down."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _fail(message: str) -> int:
    print(f"sir-vllm serve-ray: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from sir_vllm.ray.deploy import serve_config
    from sir_vllm.ray.options import RayOptionError, RayServeOptions, check_for_ray, parse_vllm_args

    ours, vllm_args = split_args(args)
    if ours.replicas < 1:
        return _fail(f"--replicas: must be >= 1, got {ours.replicas}")
    opts = RayServeOptions(model=args.model, vllm_args=tuple(vllm_args),
                           replica_cpus=ours.replica_cpus, replica_gpus=ours.replica_gpus)
    flags = parse_vllm_args(opts)  # here too, so a bad flag fails before Ray starts
    try:
        check_for_ray(flags, replicas=ours.replicas)
    except RayOptionError as e:
        return _fail(str(e))
    config = serve_config(opts, ours.replicas, flags.host or DEFAULT_HOST, flags.port or DEFAULT_PORT)
    if ours.print_config:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    return serve_until_stopped(config, flags, ours)


def serve_until_stopped(config: dict, flags, ours: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from sir_vllm.ray.app import cluster_nodes
    from sir_vllm.ray.deploy import APP_NAME, apply_config, wait_until_routed, wait_until_running
    from sir_vllm.ray.options import RayOptionError, check_for_ray

    stop = _stop_event()
    ray.init(address=ours.ray_address, log_to_driver=False)
    try:
        try:
            check_for_ray(flags, nodes=cluster_nodes(), replicas=ours.replicas)
        except RayOptionError as e:
            return _fail(str(e))
        apply_config(config)
        try:
            if wait_until_running(ours.replicas, stop=stop.is_set):
                http = config["http_options"]
                if (getattr(flags, "kv_policy", None) or "none") != "none":  # X-Sir-Replica: sessions on
                    host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::", "") else http["host"]
                    wait_until_routed(f"http://{host}:{http['port']}", ours.replicas)
                print(f"sir-vllm serve-ray: {ours.replicas} replica(s) of {flags.model} on "
                      f"http://{http['host']}:{http['port']}; Ray cluster "
                      f"{ray.get_runtime_context().gcs_address} (Serve's logs: logs/serve/ in "
                      "its session folder)", flush=True)
                stop.wait()
        finally:
            serve.delete(APP_NAME)  # also when start-up failed or was interrupted
    finally:
        ray.shutdown()
    return 0
