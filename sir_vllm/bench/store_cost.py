"""What a session store costs per operation, on a realistic session state.

The state is the largest a SirLLM session at budget B keeps: a head and K
rollback snapshots of B tokens each (ids and scores; B = 1,024 and K = 4 by
default: about 80 KB stored). Each operation is timed alone, awaited from an
asyncio loop as the server awaits it:

    put            a turn's commit (an existing session: no eviction)
    get            a turn's load
    lease+release  a turn's lock on its session, taken and given back

over `sessions` sessions in turn. `redis` uses --redis URL, else a throwaway
`redis-server` (no persistence) started for the run when one is on PATH.
Never imports vLLM or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sir_vllm.policy import make_policy
from sir_vllm.sessions.state import SessionState, Snapshot
from sir_vllm.sessions.store import SessionStore, StoreLimits, make_store, state_bytes

BACKENDS = ("memory", "sqlite", "redis")
OPERATIONS = ("put", "get", "lease+release")


@dataclass
class StoreCostConfig:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    budget: int = 1024  # tokens per snapshot (the policy's cache_size)
    snapshots: int = 4  # K: rollback snapshots besides the head
    sessions: int = 64  # distinct sessions, visited in turn
    iters: int = 500  # timed operations of each kind
    warmup: int = 50
    sqlite_path: Path | None = None  # None: a file in a fresh temporary folder
    redis_url: str | None = None  # None: a throwaway redis-server
    seed: int = 0

    def validate(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"--backends: one or more of {', '.join(BACKENDS)}, got {self.backends}")
        if self.budget < 8 or self.snapshots < 0 or self.sessions < 1 or self.iters < 1:
            raise ValueError("--budget >= 8, --snapshots >= 0, --sessions >= 1, --iters >= 1")


def realistic_state(sid: str, budget: int, snapshots: int, rng: np.random.Generator) -> SessionState:
    """A session at its budget: K + 1 snapshots of `budget` tokens each."""
    policy = make_policy("sirllm", start_size=4, entropy_size=budget - 4, recent_size=0)

    def snapshot(turn: int) -> Snapshot:
        return Snapshot(turns=turn, token_ids=rng.integers(0, 49152, budget),
                        scores=rng.gamma(2.0, 2.0, budget), pending=int(rng.integers(0, 49152)),
                        answer_tail=tuple(int(t) for t in rng.integers(0, 49152, 8)),
                        evicted_total=300 * turn, turn_id=uuid.uuid4().hex, messages=2 * turn,
                        chain=uuid.uuid4().hex)

    turns = snapshots + 10
    return SessionState(id=sid, tenant="0123456789abcdef", key=uuid.uuid4().hex, policy=policy,
                        api="chat", head=snapshot(turns),
                        history=tuple(snapshot(t) for t in range(turns - snapshots, turns)))


@contextlib.contextmanager
def throwaway_redis():
    """A redis-server on a free local port, no persistence; None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="sir-bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the throwaway redis-server on port {port} did not start")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def open_backend(kind: str, cfg: StoreCostConfig, folder: Path, redis_url: str | None,
                 prefix: str) -> SessionStore:
    limits = StoreLimits(max_sessions=max(10_000, cfg.sessions))
    if kind == "sqlite":
        return make_store(f"sqlite:{cfg.sqlite_path or folder / 'sessions.sqlite3'}", limits)
    if kind == "redis":
        from sir_vllm.sessions.redis_store import RedisStore

        return RedisStore(redis_url, limits, prefix=prefix)  # its own keys: safe on a shared Redis
    return make_store(kind, limits)


async def time_backend(store: SessionStore, states: list[SessionState], cfg: StoreCostConfig) -> dict:
    """ms per operation of each kind: {op: [samples]}."""
    n = len(states)
    for state in states:
        await store.put(state)

    async def put(i):
        await store.put(states[i % n])

    async def get(i):
        await store.get(states[i % n].tenant, states[i % n].id)

    async def lease_release(i):
        lease = await store.lease(states[i % n].tenant, states[i % n].id)
        await store.release(lease)

    samples = {}
    for op, call in zip(OPERATIONS, (put, get, lease_release)):
        for i in range(cfg.warmup):
            await call(i)
        times = []
        for i in range(cfg.iters):
            t0 = time.perf_counter()
            await call(i)
            times.append((time.perf_counter() - t0) * 1000)
        samples[op] = times
    for state in states:
        await store.delete(state.tenant, state.id)
    return samples


def run_store_cost(cfg: StoreCostConfig) -> dict:
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    states = [realistic_state(f"bench-{i}", cfg.budget, cfg.snapshots, rng) for i in range(cfg.sessions)]
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="sir-bench-store-") as tmp, contextlib.ExitStack() as stack:
        redis_url = cfg.redis_url
        if "redis" in cfg.backends and redis_url is None:
            redis_url = stack.enter_context(throwaway_redis())
        for kind in cfg.backends:
            if kind == "redis" and redis_url is None:
                notes.append("redis: not measured (no --redis URL and no redis-server on PATH)")
                continue
            store = open_backend(kind, cfg, Path(tmp), redis_url, f"sir-bench-{uuid.uuid4().hex[:8]}")

            async def measure():
                try:
                    return await time_backend(store, states, cfg)
                finally:
                    await store.close()

            for op, times in asyncio.run(measure()).items():
                t = np.asarray(times)
                rows.append({"backend": kind, "op": op, "n": len(t),
                             "p50_ms": float(np.percentile(t, 50)),
                             "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean())})
    where = {"sqlite": str(cfg.sqlite_path) if cfg.sqlite_path else "a temporary file",
             "redis": cfg.redis_url or "a throwaway local redis-server"}
    return {"config": {**asdict(cfg), "sqlite_path": str(cfg.sqlite_path or "")},
            "state_bytes": len(state_bytes(states[0])), "tokens_per_state": cfg.budget * (cfg.snapshots + 1),
            "rows": rows, "notes": notes, "where": where,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine()}}


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"session store cost per operation: budget {cfg['budget']}, K = {cfg['snapshots']} "
             f"rollback snapshots ({result['tokens_per_state']} tokens, "
             f"{result['state_bytes'] / 1024:.1f} KiB stored per state), {cfg['iters']} ops each "
             f"over {cfg['sessions']} sessions",
             f"{'backend':<8} {'operation':<14} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['backend']:<8} {r['op']:<14} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                     f"{r['mean_ms']:>8.3f}")
    lines += result["notes"]
    lines.append(f"sqlite: {result['where']['sqlite']}; redis: {result['where']['redis']}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    from sir_vllm.cli.main import main

    sys.exit(main(["bench-store", *sys.argv[1:]]))
