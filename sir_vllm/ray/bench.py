"""Figures for docs/results/ray: what the proxy and the router cost, how sessions spread.

    python -m sir_vllm.ray.bench overhead --direct URL --ray URL [--requests 200]
    python -m sir_vllm.ray.bench spread --url URL [--sessions 64]
    python -m sir_vllm.ray.bench spread-sim [--sessions 64] [--replicas 2 4 8]

`overhead` sends the same short requests (completions, max_tokens 1, one at a
time) to a `vllm serve` and to `sir-vllm serve-ray` with one replica on the
same model, alternating between them so both see the same machine load:
requests without a session, then session turns (X-Session-ID, so through
the router's table). `spread` starts N sessions through the proxy and counts
them by the replica that answered (X-Sir-Replica). `spread-sim` places N
sessions on fake replicas with this router and with Ray's consistent-hash
router, and counts what adding one replica moves. JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections import Counter


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def _post(client, url: str, model: str, sid: str | None, prompt: str) -> float:
    headers = {"X-Session-ID": sid} if sid else {}
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", headers=headers, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0})
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed


def overhead(direct: str, ray: str, model: str, requests: int = 200, sessions: int = 20,
             warmup: int = 10) -> dict:
    """p50/p99 latency per request on both endpoints, without and with sessions."""
    import httpx

    out = {}
    with httpx.Client(timeout=300) as client:
        for url in (direct, ray):
            for i in range(warmup):
                _post(client, url, model, None, f"warm up {i}")
        for case in ("no-session", "session"):
            times = {direct: [], ray: []}
            tag = uuid.uuid4().hex[:6]
            for i in range(requests):
                sid = f"bench-{tag}-{i % sessions}" if case == "session" else None
                prompt = f" Turn {i // sessions}: number {i}." if sid else f"Request {i}: hello"
                for url in ((direct, ray) if i % 2 else (ray, direct)):
                    times[url].append(_post(client, url, model, sid, prompt))
            d, r = summary_ms(times[direct]), summary_ms(times[ray])
            out[case] = {"vllm_serve": d, "serve_ray": r,
                         "p50_overhead_ms": round(r["p50_ms"] - d["p50_ms"], 2),
                         "p99_overhead_ms": round(r["p99_ms"] - d["p99_ms"], 2)}
    return out


def spread_live(url: str, model: str, sessions: int = 64) -> dict:
    """Start `sessions` sessions through the proxy; count them by replica."""
    import httpx

    tag = uuid.uuid4().hex[:6]
    with httpx.Client(timeout=300) as client:
        by = Counter()
        for i in range(sessions):
            r = client.post(url + "/v1/completions", headers={"X-Session-ID": f"spread-{tag}-{i}"},
                            json={"model": model, "prompt": f"Session {i}", "max_tokens": 1})
            r.raise_for_status()
            by[r.headers["x-sir-replica"]] += 1
    return spread_stats(by, sessions)


def spread_stats(by: Counter, sessions: int, replicas: int | None = None) -> dict:
    counts = list(by.values()) + [0] * max(0, (replicas or len(by)) - len(by))
    mean = sessions / len(counts)
    return {"sessions": sessions, "replicas": len(counts), "per_replica": sorted(counts),
            "max_over_mean": round(max(counts) / mean, 3)}


def spread_simulated(sessions: int = 64, replicas: tuple[int, ...] = (2, 4, 8), seed: int = 0) -> dict:
    """This router vs Ray's ConsistentHashRouter on fake replicas: spread of
    `sessions` new sessions, and sessions moved when one replica is added."""
    return asyncio.run(_simulate(sessions, replicas, seed))


async def _simulate(sessions: int, replicas: tuple[int, ...], seed: int) -> dict:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
    from ray.serve.request_router import PendingRequest, ReplicaID

    from sir_vllm.ray.router import SessionAffinityRouter

    deployment = DeploymentID(name="sim", app_name="sim")

    class Fake:
        def __init__(self, name):
            self.replica_id = ReplicaID(unique_id=name, deployment_id=deployment)
            self.max_ongoing_requests, self.node_id, self.availability_zone = 10**9, "n", None
            self.multiplexed_model_ids, self.routing_stats, self.is_cross_language = set(), {}, False

        async def get_queue_len(self, *, deadline_s):
            return 0

    async def place(router, sid):
        pr = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
            request_id=sid, internal_request_id=uuid.uuid4().hex, session_id=sid))
        replica = await router._choose_replica_for_request(pr)
        router.on_request_routed(pr, replica.replica_id, None)
        return replica.replica_id.unique_id

    ids = [str(uuid.uuid5(uuid.NAMESPACE_OID, f"{seed}/{i}")) for i in range(sessions)]
    out = {}
    for cls in (SessionAffinityRouter, ConsistentHashRouter):
        rows = []
        for n in replicas:
            fakes = [Fake(f"r{i}") for i in range(n)]
            router = cls(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
            router.initialize_state()
            router.update_replicas(fakes)
            before = {sid: await place(router, sid) for sid in ids}
            router.update_replicas([*fakes, Fake(f"r{n}")])
            after = {sid: await place(router, sid) for sid in ids}
            moved = sum(before[s] != after[s] for s in ids)
            rows.append({**spread_stats(Counter(before.values()), sessions, n),
                         "moved_when_one_added": moved})
        out[cls.__name__] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sir_vllm.ray.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--direct", required=True, help="a `vllm serve` URL")
    o.add_argument("--ray", required=True, help="a `sir-vllm serve-ray` URL (one replica)")
    o.add_argument("--model", default="tiny")
    o.add_argument("--requests", type=int, default=200)
    o.add_argument("--sessions", type=int, default=20)
    s = sub.add_parser("spread")
    s.add_argument("--url", required=True)
    s.add_argument("--model", default="tiny")
    s.add_argument("--sessions", type=int, default=64)
    m = sub.add_parser("spread-sim")
    m.add_argument("--sessions", type=int, default=64)
    m.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    args = p.parse_args(argv)
    if args.what == "overhead":
        result = overhead(args.direct, args.ray, args.model, args.requests, args.sessions)
    elif args.what == "spread":
        result = spread_live(args.url, args.model, args.sessions)
    else:
        result = spread_simulated(args.sessions, tuple(args.replicas))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
