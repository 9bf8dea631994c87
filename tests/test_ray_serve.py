"""sir-vllm on Ray Serve (issue 13): the builder's checks, then `sir-vllm serve-ray` for real.

The end-to-end tests start a local Ray cluster in this process, run the real
command (`sir-vllm serve-ray MODEL --replicas 2 ... --ray-address`) against it
with 2 replicas of the tiny model and a private redis-server as the shared
session store, and talk to Serve's proxy over HTTP. Every session response
names its replica (`X-Sir-Replica`: the replica's Serve id, also its actor's
name). Scaling applies the command's own config (`--print-config`) with
another `num_replicas`, as an operator would; a replica is killed with
`ray.kill`. The scale and kill tests are `slow` (each starts an engine).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from sir_vllm.cli.main import main as sir_vllm_main
from sir_vllm.ray.options import RayOptionError, RayServeOptions, check_for_ray, parse_vllm_args
from sir_vllm.server.process import free_port, popen_guarded, stop_guarded

from redis_server import RedisServer

POLICY = ["--kv-policy", "sirllm", "--kv-start-size", "4", "--kv-entropy-size", "60",
          "--kv-recent-size", "0"]
BASE = ["--served-model-name", "tiny", "--dtype", "float32", "--kv-cache-memory-bytes", "256M",
        "--max-model-len", "1024", "--enforce-eager"]
NO_EVICTION = {"name": "sirllm", "start_size": 4, "entropy_size": 900, "recent_size": 0}
START_TIMEOUT_S = float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "1800"))
READY = "replica(s) of"


# -- the flags and the command, no cluster ----------------------------------------

def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = sir_vllm_main(["serve-ray", *argv])
    return rc, out.getvalue()


def test_print_config_is_what_serve_run_takes(tiny_serving_model):
    rc, text = run_cli(str(tiny_serving_model), "--replicas", "3", *BASE, *POLICY, "--port", "8123",
                       "--print-config")
    config = yaml.safe_load(text)
    assert rc == 0
    app = config["applications"][0]
    assert app["import_path"] == "sir_vllm.ray.app:build_app" and app["route_prefix"] == "/"
    assert app["deployments"] == [{"name": "sir-vllm", "num_replicas": 3}]
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8123}
    assert config["proxy_location"] == "HeadOnly"
    opts = RayServeOptions.from_dict(app["args"])  # what the builder reads back
    assert opts.model == str(tiny_serving_model) and "--replicas" not in opts.vllm_args
    assert list(opts.vllm_args) == [*BASE, *POLICY, "--port", "8123"]


def test_a_memory_store_is_refused_with_several_replicas(tiny_serving_model, capsys):
    rc, _ = run_cli(str(tiny_serving_model), "--replicas", "2", *POLICY,
                    "--kv-session-store", "memory", "--print-config")
    assert rc == 2
    err = capsys.readouterr().err
    assert "--kv-session-store memory with 2 replicas" in err and "redis://" in err
    rc, _ = run_cli(str(tiny_serving_model), *POLICY, "--kv-session-store", "memory",
                    "--print-config")
    assert rc == 0  # one replica: its own store is the only one


def vllm_flags(model, *flags):
    return parse_vllm_args(RayServeOptions(model=str(model), vllm_args=tuple(flags)))


def test_sqlite_is_refused_on_a_cluster_of_several_nodes(tiny_serving_model):
    for store in ([], ["--kv-session-store", "sqlite:/tmp/x.sqlite3"]):
        args = vllm_flags(tiny_serving_model, *POLICY, *store)
        check_for_ray(args, nodes=1, replicas=4)  # one host: the file is shared
        with pytest.raises(RayOptionError, match="cluster has 3 nodes.*redis://"):
            check_for_ray(args, nodes=3)
    check_for_ray(vllm_flags(tiny_serving_model, *POLICY, "--kv-session-store",
                             "redis://127.0.0.1:6379/0"), nodes=3, replicas=4)


@pytest.mark.parametrize("flags, message", [
    (["--api-server-count", "2"], "a replica is one API server"),
    (["--data-parallel-size", "2"], "each replica is one engine"),
    (["--kv-start-size", "4"], "needs --kv-policy"),
    (["--distributed-executor-backend", "ray"], "platform does not run engine workers on Ray"),  # the `vllm serve --kv-policy` checks run too
])
def test_flags_a_replica_cannot_serve_are_refused(tiny_serving_model, flags, message):
    policy = [] if "--kv-start-size" in flags else POLICY
    with pytest.raises(RayOptionError, match=message):
        check_for_ray(vllm_flags(tiny_serving_model, *policy, *flags))


def test_builder_args_are_checked():
    with pytest.raises(RayOptionError, match="unknown argument.*replica_count"):
        RayServeOptions.from_dict({"model": "m", "replica_count": 2})
    with pytest.raises(RayOptionError, match="model: required"):
        RayServeOptions.from_dict({"vllm_args": []})
    opts = RayServeOptions.from_dict({"model": "m", "vllm_args": "--kv-policy sirllm --port 1"})
    assert opts.vllm_args == ("--kv-policy", "sirllm", "--port", "1")


def test_the_example_config_builds():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[1] / "launch" / "ray-serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    opts = RayServeOptions.from_dict(app["args"])
    assert not opts.model.startswith("~")
    check_for_ray(parse_vllm_args(opts), nodes=1, replicas=app["deployments"][0]["num_replicas"])


def test_the_deployment_uses_the_session_router(tiny_serving_model):
    from sir_vllm.ray.app import deployment_options

    args = vllm_flags(tiny_serving_model, *POLICY, "--kv-session-ttl", "600")
    options = deployment_options(RayServeOptions(model=str(tiny_serving_model)), args)
    router = options["request_router_config"]
    assert router.request_router_class == "sir_vllm.ray.router.SessionAffinityRouter"
    assert router.request_router_kwargs == {"session_ttl_s": 600.0}
    assert "num_replicas" not in options  # the config's: scaling is an in-place update


# -- end to end: the command on a local Ray cluster ----------------------------------

@dataclass
class Served:
    url: str
    argv: list[str]  # serve-ray's arguments, --replicas excepted
    log: Path


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("ray-redis")) as url:
        yield url


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster owned by this process (ray.shutdown stops all of it)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(2)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    raise AssertionError(f"sir-vllm serve-ray not ready (rc {proc.poll()}):\n{tail}")


@pytest.fixture(scope="module")
def served(tiny_serving_model, ray_cluster, redis_url, tmp_path_factory):
    """`sir-vllm serve-ray` with 2 replicas; stopped (SIGTERM: it deletes its app) after."""
    port = free_port()
    argv = [str(tiny_serving_model), "--replica-cpus", "1", "--ray-address", ray_cluster,
            "--host", "127.0.0.1", "--port", str(port), *BASE, *POLICY,
            "--kv-session-store", redis_url]
    log = tmp_path_factory.mktemp("serve-ray") / "serve-ray.log"
    command = [str(Path(sys.executable).parent / "sir-vllm"), "serve-ray", *argv, "--replicas", "2"]
    with open(log, "w") as out:
        proc, guard = popen_guarded(command, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        wait_for_line(proc, log, READY, START_TIMEOUT_S)
        print(f"serve-ray with 2 replicas ready in {time.monotonic() - t0:.0f} s")
        yield Served(f"http://127.0.0.1:{port}", argv, log)
    finally:
        stop_guarded(proc, guard, timeout=180)


def scale(served: Served, replicas: int) -> None:
    """Apply the command's own config with another replica count, as an operator would."""
    from sir_vllm.ray.deploy import (apply_config, running_replicas, wait_until_routed,
                                     wait_until_running)
    from ray import serve

    rc, text = run_cli(*served.argv, "--replicas", str(replicas), "--print-config")
    assert rc == 0
    if running_replicas(serve.status().applications.get("sir-vllm"), "sir-vllm") == replicas:
        return
    apply_config(yaml.safe_load(text))
    wait_until_running(replicas, timeout_s=START_TIMEOUT_S)
    wait_until_routed(served.url, replicas)  # the proxy's router knows them all


def turn(url: str, sid: str | None, prompt: str, *, in_body: bool = False, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **extra}
    headers = {}
    if sid and in_body:
        body["session_id"] = sid
    elif sid:
        headers["X-Session-ID"] = sid
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    return r


def replica_of(r: httpx.Response) -> str:
    return r.headers["x-sir-replica"]


def info(url: str, sid: str, header: bool = True) -> httpx.Response:
    r = httpx.get(f"{url}/v1/sessions/{sid}", headers={"X-Session-ID": sid} if header else {},
                  timeout=60)
    assert r.status_code == 200, r.text
    return r


PROMPTS = ["The quick brown fox", " jumps over the lazy dog.", " Then it sleeps.", " And wakes up.",
           " It runs to the river.", " The water is cold."]


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def test_sessions_stay_on_their_replica(served):
    sessions = [new_id("k") for _ in range(4)]
    seen: dict[str, list[str]] = {sid: [] for sid in sessions}
    last: dict[str, dict] = {}
    for t in range(3):
        for sid in sessions:
            r = turn(served.url, sid, PROMPTS[t] + f" ({sid})")
            seen[sid].append(replica_of(r))
            last[sid] = s = r.json()["session"]
            assert s["turns"] == t + 1
            if t:  # its pins were where it went: nothing recomputed
                assert s["loaded_tokens"] > 0 and s["recomputed_tokens"] == 0, (sid, s)
    assert all(len(set(where)) == 1 for where in seen.values()), seen
    assert len({where[0] for where in seen.values()}) == 2, seen  # new sessions spread
    for sid in sessions:
        own = info(served.url, sid)  # with the header: its own replica
        assert replica_of(own) == seen[sid][0]
        assert own.json()["turns"] == 3
        assert own.json()["retained_tokens"] == last[sid]["retained_tokens"]
        anywhere = info(served.url, sid, header=False)  # by load: the shared store answers
        assert anywhere.json() == own.json()


def test_body_only_session_ids_are_served_from_the_store(served):
    """The router cannot see a body: such a session goes by load, and each turn
    is answered from the shared store, recomputing its kept tokens when it lands
    away from its pins: the same answers as a header session, never a refusal."""
    body_sid, header_sid = new_id("body"), new_id("head")
    replicas, previous = [], None
    for t, prompt in enumerate(PROMPTS):
        extra = {"kv_policy": NO_EVICTION} if t == 0 else {}
        a = turn(served.url, body_sid, prompt, in_body=True, **extra)
        b = turn(served.url, header_sid, prompt, **extra)
        assert a.json()["choices"][0]["token_ids"] == b.json()["choices"][0]["token_ids"], t
        sa, sb = a.json()["session"], b.json()["session"]
        assert sa["turns"] == sb["turns"] == t + 1
        assert sa["retained_tokens"] == sb["retained_tokens"]
        here = replica_of(a)
        if previous is not None and here != previous:  # its pins are on the other replica
            assert sa["loaded_tokens"] == 0 and sa["recomputed_tokens"] > 0, sa
        elif previous is not None:
            assert sa["loaded_tokens"] > 0 and sa["recomputed_tokens"] == 0, sa
        replicas.append(here)
        previous = here
    print(f"body-only session's turns on replicas: {replicas}")


def sessions_by_replica(served: Served, count: int, prompt: str, **extra) -> dict[str, list[str]]:
    """`count` new sessions, one turn each; their ids by the replica that took them."""
    out: dict[str, list[str]] = {}
    for _ in range(count):
        sid = new_id("s")
        out.setdefault(replica_of(turn(served.url, sid, prompt, **extra)), []).append(sid)
    return out


@pytest.mark.slow
def test_scale_in_hands_sessions_to_the_remaining_replica(served):
    scale(served, 2)
    placed = sessions_by_replica(served, 4, PROMPTS[0])
    assert len(placed) == 2
    before = {sid: info(served.url, sid).json() for ids in placed.values() for sid in ids}
    scale(served, 1)
    remaining = None
    for where, ids in placed.items():
        for sid in ids:
            r = turn(served.url, sid, PROMPTS[1])
            remaining = remaining or replica_of(r)
            s = r.json()["session"]
            assert replica_of(r) == remaining and s["turns"] == 2
            if where != remaining:  # its replica is gone: the kept tokens came from the store
                assert s["recomputed_tokens"] == before[sid]["retained_tokens"] > 0, s
            else:
                assert s["loaded_tokens"] > 0 and s["recomputed_tokens"] == 0, s
    assert remaining in placed


@pytest.mark.slow
def test_scale_out_moves_no_session(served):
    scale(served, 1)
    placed = sessions_by_replica(served, 3, PROMPTS[0])
    (old,) = placed
    scale(served, 2)
    for sid in placed[old]:
        r = turn(served.url, sid, PROMPTS[1])
        assert replica_of(r) == old
        assert r.json()["session"]["loaded_tokens"] > 0
        assert r.json()["session"]["recomputed_tokens"] == 0
    fresh = sessions_by_replica(served, 3, PROMPTS[0])
    assert old not in fresh and len(fresh) == 1, fresh  # the new replica takes the new ones


def test_a_killed_replicas_sessions_continue_on_another(served):
    """Last in the module: Serve replaces the killed replica in the background."""
    import ray

    scale(served, 2)
    victim = witness = None
    for _ in range(8):  # two sessions with the same first turn, one on each replica
        placed = sessions_by_replica(served, 1, PROMPTS[0], kv_policy=NO_EVICTION)
        (where, (sid,)), = placed.items()
        if victim is None:
            victim = (where, sid)
        elif where != victim[0]:
            witness = (where, sid)
            break
    assert witness is not None, "new sessions never reached the second replica"
    (dead, vsid), (alive, wsid) = victim, witness
    for prompt in PROMPTS[1:3]:
        assert replica_of(turn(served.url, vsid, prompt)) == dead
        assert replica_of(turn(served.url, wsid, prompt)) == alive
    before = info(served.url, vsid).json()
    ray.kill(ray.get_actor(dead, namespace="serve"), no_restart=True)
    after = info(served.url, vsid, header=False).json()
    assert after["tokens"] == before["tokens"] and after["turns"] == 3
    moved = turn(served.url, vsid, PROMPTS[3])
    same = turn(served.url, wsid, PROMPTS[3])
    assert replica_of(moved) == alive
    s = moved.json()["session"]
    assert s["turns"] == 4 and s["recomputed_tokens"] == before["retained_tokens"] > 0
    assert s["loaded_tokens"] == 0
    assert moved.json()["choices"][0]["token_ids"] == same.json()["choices"][0]["token_ids"]
    assert s["retained_tokens"] == same.json()["session"]["retained_tokens"]
    again = turn(served.url, vsid, PROMPTS[4])  # and from now on its pins are there
    assert replica_of(again) == alive and again.json()["session"]["loaded_tokens"] > 0
