"""Figures for "Scaling out with Ray": turns/s with 1 and 2 replicas, and a failover.

    python -m sir_vllm.ray.scaling_bench MODEL [--sessions 8] [--turns 4] -- [vllm serve flags]

MODEL `tiny` builds the tests' tiny serving model (2 layers, 2 KV heads) in a
temporary folder. The run owns everything it starts: a local Ray cluster
(`ray.init` in this process), a private `redis-server` as the shared session
store (unless the flags name a store), and `sir-vllm serve-ray` as a child.

0. the proxy-plus-router overhead per request: the same one-token requests,
   alternating, to the one replica and to a plain `vllm serve` with the same
   flags (`bench.overhead`; `--no-overhead` skips it);
1. `--replicas 1`: `--sessions` sessions, run concurrently, `--turns` turns each
   (turns/s over the wall time, the turn latencies, sessions per replica);
2. the same config applied with `num_replicas: 2` (an in-place scale-out: the
   first replica and its sessions stay: one more turn each says so), then as
   many one-turn sessions as the first replica holds (phase 1's and the
   overhead's: the new replica takes them all, to even the counts), then the
   same load as in 1 on new sessions, which now spread;
3. failover: one turn more for every session of phase 2, the replica holding
   most of them killed (`ray.kill`) between two turns; each of its sessions
   must continue on the other replica with nothing loaded (its pins died with
   the replica): every kept token recomputed (`recomputed_tokens`, at most the
   `retained_tokens` it had: the turn keeps what leaves room for its own
   tokens), the others with nothing recomputed.

JSON on stdout (and `--out FILE`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READY = "replica(s) of"
OVERHEAD_SESSIONS = 10  # sessions the overhead measurement places on the first replica
SERVED = "tiny"
PROMPTS = ["The quick brown fox", " jumps over the lazy dog.", " Then it sleeps.",
           " And wakes up.", " It runs to the river.", " The water is cold.", " It swims."]


def prompt(sid: str, t: int) -> str:
    """Turn `t`'s text; the first names the session, so no two sessions share a
    prefix (vLLM's prefix cache would hide recomputation across sessions)."""
    text = PROMPTS[t % len(PROMPTS)]
    return f"Session {sid}: {text}" if t == 0 else text


def turn(client, url: str, sid: str, prompt: str, max_tokens: int) -> tuple[dict, str, float]:
    """One session turn: (session object, replica, seconds)."""
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", headers={"X-Session-ID": sid}, json={
        "model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True})
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return r.json()["session"], r.headers["x-sir-replica"], elapsed


def load(url: str, sessions: int, turns: int, max_tokens: int) -> tuple[dict, dict[str, str]]:
    """`sessions` new sessions at once, `turns` turns each; (figures, replica of each session)."""
    import httpx

    tag = uuid.uuid4().hex[:6]
    ids = [f"scale-{tag}-{i}" for i in range(sessions)]
    latencies: list[float] = []
    where: dict[str, set[str]] = {sid: set() for sid in ids}

    def run(sid: str) -> None:
        with httpx.Client(timeout=600) as client:
            for t in range(turns):
                _, replica, s = turn(client, url, sid, prompt(sid, t), max_tokens)
                latencies.append(s)
                where[sid].add(replica)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(run, ids))
    wall = time.perf_counter() - t0
    per = Counter(next(iter(w)) for w in where.values())
    ms = sorted(x * 1000 for x in latencies)
    return {"sessions": sessions, "turns_each": turns, "max_tokens": max_tokens,
            "wall_s": round(wall, 2), "turns_per_s": round(len(latencies) / wall, 2),
            "turn_p50_ms": round(ms[len(ms) // 2], 1), "turn_mean_ms": round(statistics.fmean(ms), 1),
            "sessions_per_replica": sorted(per.values()),
            "sessions_that_moved": sum(len(w) > 1 for w in where.values())}, \
        {sid: next(iter(w)) for sid, w in where.items()}


def failover(url: str, placed: dict[str, str], max_tokens: int) -> dict:
    """Kill the replica holding most sessions; one more turn for every session."""
    import httpx
    import ray

    with httpx.Client(timeout=600) as client:
        before = {sid: client.get(f"{url}/v1/sessions/{sid}").json() for sid in placed}
        victim = Counter(placed.values()).most_common(1)[0][0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        t0 = time.perf_counter()
        rows = []
        for sid, old in placed.items():
            s, replica, secs = turn(client, url, sid, PROMPTS[-1], max_tokens)
            rows.append({"moved": old == victim, "replica": replica, "seconds": secs,
                         "recomputed": s["recomputed_tokens"], "loaded": s["loaded_tokens"],
                         "had": before[sid]["retained_tokens"], "turns": s["turns"],
                         "turns_before": before[sid]["turns"]})
        wall = time.perf_counter() - t0
    moved = [r for r in rows if r["moved"]]
    stayed = [r for r in rows if not r["moved"]]
    return {
        "killed_replica_sessions": len(moved), "other_replica_sessions": len(stayed),
        "moved_continued_on_the_survivor": all(r["replica"] != victim for r in moved),
        "moved_recomputed_tokens": [r["recomputed"] for r in moved],
        "moved_retained_before": [r["had"] for r in moved],
        "moved_loaded_tokens": [r["loaded"] for r in moved],
        # nothing loaded (the pins died with the replica): every kept token recomputed
        "moved_recomputed_all_kept": all(r["loaded"] == 0 and 0 < r["recomputed"] <= r["had"]
                                         for r in moved),
        "stayed_recomputed_tokens": sum(r["recomputed"] for r in stayed),
        "turn_counts_continue": all(r["turns"] == r["turns_before"] + 1 for r in rows),
        "first_turn_after_kill_s": round(rows[0]["seconds"], 2) if rows else None,
        "all_turns_after_kill_s": round(wall, 2),
    }


def serve_ray(argv: list[str], log: Path):
    """`sir-vllm serve-ray ARGV --replicas 1` as a child; returns (process, its guard) once up."""
    from sir_vllm.server.process import popen_guarded

    command = [str(Path(sys.executable).parent / "sir-vllm"), "serve-ray", *argv, "--replicas", "1"]
    with open(log, "w") as out:
        proc, guard = popen_guarded(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1800
    while READY not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc, guard)
            raise RuntimeError(f"serve-ray did not start:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    return proc, guard


def scale_to(argv: list[str], url: str, replicas: int) -> None:
    """Apply the command's own config (`--print-config`) with another replica count:
    the same args, so Serve adds a replica and leaves the running one alone."""
    import contextlib
    import io

    import yaml

    from sir_vllm.cli.main import main as sir_vllm_main
    from sir_vllm.ray.deploy import apply_config, wait_until_routed, wait_until_running

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = sir_vllm_main(["serve-ray", *argv, "--replicas", str(replicas), "--print-config"])
    if rc:
        raise RuntimeError(f"serve-ray --print-config exited {rc}")
    apply_config(yaml.safe_load(out.getvalue()))
    wait_until_running(replicas, timeout_s=1800)
    wait_until_routed(url, replicas)


def stop(proc, guard) -> None:
    from sir_vllm.server.process import stop_guarded

    stop_guarded(proc, guard, timeout=180)  # Ray's shutdown takes a while


def measure(model: str, flags: list[str], sessions: int, turns: int, max_tokens: int,
            work: Path, with_overhead: bool = True) -> dict:
    import ray

    from sir_vllm.server.process import free_port

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        argv = [model, "--ray-address", ray.get_runtime_context().gcs_address,
                "--host", "127.0.0.1", "--port", str(port), *flags]
        proc, guard = serve_ray(argv, work / "serve-ray.log")
        try:
            overhead = proxy_overhead(model, flags, url, work) if with_overhead else None
            one, first = load(url, sessions, turns, max_tokens)
            t0 = time.perf_counter()
            scale_to(argv, url, 2)
            scale_s = time.perf_counter() - t0
            kept = revisit(url, first, max_tokens)
            # the new replica takes new sessions until it holds as many as the first
            # (phase 1's and the overhead measurement's)
            fill, _ = load(url, sessions + (OVERHEAD_SESSIONS if with_overhead else 0), 1,
                           max_tokens)
            two, placed = load(url, sessions, turns, max_tokens)
            fail = failover(url, placed, max_tokens)
        finally:
            stop(proc, guard)
    finally:
        ray.shutdown()
    return {"model": model, "vllm_flags": flags, "proxy_overhead_1_replica": overhead,
            "one_replica": one, "scale_1_to_2_s": round(scale_s, 1),
            "after_scale_out": {"first_sessions": kept,
                                "next_new_sessions_per_replica": fill["sessions_per_replica"]},
            "two_replicas": two, "failover": fail}


def revisit(url: str, placed: dict[str, str], max_tokens: int) -> dict:
    """One more turn for each session: did any move, did any recompute?"""
    import httpx

    moved = recomputed = 0
    with httpx.Client(timeout=600) as client:
        for sid, where in placed.items():
            s, replica, _ = turn(client, url, sid, PROMPTS[-1], max_tokens)
            moved += replica != where
            recomputed += s["recomputed_tokens"]
    return {"sessions": len(placed), "moved": moved, "recomputed_tokens": recomputed}


def proxy_overhead(model: str, flags: list[str], ray_url: str, work: Path) -> dict:
    """`bench.overhead`: the same requests to a `vllm serve` with the same flags
    (its own in-memory store: the session ids are the same on both) and to the
    one replica behind the proxy and the router."""
    from sir_vllm.ray.bench import overhead
    from sir_vllm.server.process import ServerProcess

    direct_flags = list(flags)
    at = direct_flags.index("--kv-session-store")
    direct_flags[at + 1] = "memory"
    name = direct_flags.index("--served-model-name")
    served = direct_flags.pop(name + 1)
    direct_flags.pop(name)
    with ServerProcess(model=model, served_model_name=served, extra_args=direct_flags,
                       log_path=work / "vllm-serve.log").start(timeout=1800) as direct:
        return overhead(direct.url, ray_url, served, requests=100, sessions=OVERHEAD_SESSIONS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sir_vllm.ray.scaling_bench", description=__doc__,
                                usage="%(prog)s MODEL [options] -- [vllm serve flags]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder, or `tiny`")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path)
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the proxy-overhead phase (it starts a `vllm serve` beside the replica)")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    flags = argv[cut + 1:]  # the `vllm serve` flags
    with tempfile.TemporaryDirectory(prefix="sir-ray-bench-") as tmp:
        work = Path(tmp)
        model = args.model
        if model == "tiny":
            from sir_vllm.models.tiny import make_tiny

            model = str(make_tiny(work / "tiny", hidden=128, heads=2, kv_heads=2))
        if "--served-model-name" not in flags:
            flags = ["--served-model-name", SERVED, *flags]
        redis = None
        if "--kv-session-store" not in flags:
            redis = _private_redis(work)
            flags = [*flags, "--kv-session-store", redis.url]
        try:
            result = measure(model, flags, args.sessions, args.turns, args.max_tokens, work,
                             with_overhead=not args.no_overhead)
        finally:
            if redis is not None:
                redis.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _private_redis(work: Path):
    """The tests' private redis-server (tests/redis_server.py), for a store every replica reaches."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from redis_server import RedisServer

    server = RedisServer(work / "redis")
    server.start()
    return server


if __name__ == "__main__":
    raise SystemExit(main())
