"""The Serve config for a set of options, and deploying it as `serve run CONFIG.yaml` does.

`sir-vllm serve-ray` writes the same config a user would (`--print-config`
shows it) and applies it declaratively, so the replica count is Serve's
`num_replicas`: applying the config again with another count adds or
removes replicas and leaves the running ones, and their sessions, alone
(an imperative `serve.run` would restart every replica). One proxy, on the
head node: the router's session table lives in the proxy, so one proxy means
one table (see router.py for several).
"""

from __future__ import annotations

import time
from typing import Callable

from sir_vllm.ray.options import RayServeOptions

APP_NAME = "sir-vllm"
BUILDER = "sir_vllm.ray.app:build_app"


def serve_config(opts: RayServeOptions, replicas: int, host: str, port: int) -> dict:
    """The Serve config file's content (ServeDeploySchema) for these options."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": BUILDER,
            "args": opts.to_dict(),
            "deployments": [{"name": opts.name, "num_replicas": replicas}],
        }],
    }


def apply_config(config: dict) -> None:
    """Start Serve if needed and apply the config (what `serve run CONFIG.yaml` does)."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema)


def running_replicas(status, deployment: str) -> int:
    info = status.deployments.get(deployment) if status is not None else None
    return 0 if info is None else int(info.replica_states.get("RUNNING", 0))


def wait_until_running(replicas: int, app: str = APP_NAME, deployment: str = APP_NAME,
                       timeout_s: float = 1800.0, poll_s: float = 2.0,
                       stop: Callable[[], bool] = lambda: False) -> bool:
    """Block until the app runs with `replicas` replicas up (True), or `stop()`
    says to give up (False); RuntimeError with Serve's message if the app failed
    to deploy or is not up after `timeout_s`."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while not stop():
        status = serve.status().applications.get(app)
        if (status is not None and status.status == ApplicationStatus.RUNNING
                and running_replicas(status, deployment) == replicas):
            return True
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Serve could not deploy {app}: {status.message}")
        if time.monotonic() > deadline:
            state = status.status if status is not None else "not submitted"
            raise RuntimeError(f"{app} not running with {replicas} replica(s) after "
                               f"{timeout_s:.0f} s ({state})")
        time.sleep(poll_s)
    return False


def wait_until_routed(url: str, replicas: int, timeout_s: float = 120.0) -> set[str]:
    """Block until requests through the proxy at `url` reach `replicas` distinct
    replicas (their X-Sir-Replica). The controller reports a new replica RUNNING
    a moment before the proxy's router learns of it; a session placed in that
    moment goes to the replicas the router knew. Probes `GET /v1/sessions/...`
    without a session id (by load; a 404 that names its replica)."""
    import httpx

    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30) as client:
        while len(seen) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"requests reached {len(seen)} of {replicas} replicas "
                                   f"after {timeout_s:.0f} s: {sorted(seen)}")
            r = client.get(f"{url}/v1/sessions/sir-vllm-routing-probe")
            if "x-sir-replica" in r.headers:
                seen.add(r.headers["x-sir-replica"])
            else:
                time.sleep(0.2)
    return seen
