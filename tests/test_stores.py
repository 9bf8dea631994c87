"""Every session store backend against one suite: `memory`, `sqlite` (a file in
a tmp dir) and `redis` (a private redis-server: tests/redis_server.py).

Beyond the interface (round trip, tenants, delete, list, leases, cap, TTL):
two real processes share one store; a real child process dies at the fault
hook after the engine answered, before and in the middle of the write, and
the store must then hold the previous turn's state, whole; and the sessions
service runs the same turns with the same results on every backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sir_vllm.policy import make_policy
from sir_vllm.sessions import (ServiceConfig, SessionService, SessionState, Snapshot, StoreLimits,
                               TurnRequest, make_store)
from sir_vllm.sessions.store import FAULT_ENV, FAULT_EXIT_CODE, FAULT_POINTS, Lease

from fake_engine import FakeEngine
from redis_server import RedisServer

TESTS = Path(__file__).resolve().parent
POLICY = make_policy("sirllm", start_size=4, entropy_size=40, recent_size=16)  # budget 60
BACKENDS = ["memory", "sqlite", "redis"]
SHARED = ["sqlite", "redis"]  # the backends that outlive a process
TURNS = [list(range(10, 40)), list(range(60, 75)), list(range(80, 92)), [7, 8, 9]]
CRASH_LEASE_S = 3.0  # the crashing child's lease_seconds
CHILD_TIMEOUT_S = 60.0


# ---- the backends ---------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """One redis-server for the module (no persistence); stopped at the end."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as url:
        yield url


def empty_spec(kind: str, tmp_path: Path, request) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'sessions.sqlite3'}"
    import redis

    url = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture(params=BACKENDS)
def spec(request, tmp_path) -> str:
    """A `--kv-session-store` value of one backend, with nothing in it yet."""
    return empty_spec(request.param, tmp_path, request)


@pytest.fixture(params=SHARED)
def shared_spec(request, tmp_path) -> str:
    return empty_spec(request.param, tmp_path, request)


def kind_of(spec: str) -> str:
    return spec.split(":", 1)[0]


def open_store(spec: str, drops: list | None = None, **limits):
    on_drop = None if drops is None else (lambda state, reason: drops.append((state, reason)))
    return make_store(spec, StoreLimits(**limits), on_drop)


@contextlib.asynccontextmanager
async def opened(spec: str, drops: list | None = None, **limits):
    store = open_store(spec, drops, **limits)
    try:
        yield store
    finally:
        await store.close()


def run(coro):
    return asyncio.run(coro)


# ---- states -----------------------------------------------------------------------

def sample_state(sid: str, tenant: str = "t", seed: int = 0, turns: int = 3) -> SessionState:
    """A chat session after `turns` turns, with K = turns - 1 rollback snapshots."""
    rng = np.random.default_rng(seed)

    def snapshot(turn: int) -> Snapshot:
        n = 20 + 7 * turn
        return Snapshot(turns=turn, token_ids=rng.integers(0, 49152, n),
                        scores=rng.random(n) * 9, pending=int(rng.integers(0, 49152)),
                        answer_tail=tuple(int(t) for t in rng.integers(0, 49152, 8)),
                        evicted_total=5 * turn, turn_id=f"turn-{seed}-{turn}", messages=2 * turn,
                        chain=f"{seed:08x}{turn:024x}")

    return SessionState(id=sid, tenant=tenant, key=f"key-{tenant}-{sid}-{seed}", policy=POLICY,
                        api="chat", head=snapshot(turns),
                        history=tuple(snapshot(t) for t in range(1, turns)))


def assert_same(got: SessionState | None, want: SessionState) -> None:
    assert got is not None
    assert got.to_dict() == want.to_dict()
    assert got.head.token_ids.dtype == np.int64 and got.head.token_ids.tolist() == \
        want.head.token_ids.tolist()
    assert got.head.scores.tolist() == want.head.scores.tolist()


# ---- the interface, on every backend -------------------------------------------------

def test_a_state_round_trips_whole(spec):
    first, second = sample_state("s", seed=1), sample_state("s", seed=2, turns=5)

    async def go():
        async with opened(spec) as store:
            await store.put(first)
            got_first = await store.get("t", "s")
            await store.put(second)
            return got_first, await store.get("t", "s"), await store.get("t", "nope")

    got_first, got_second, missing = run(go())
    assert_same(got_first, first)
    assert_same(got_second, second)  # a put replaces the state whole
    assert len(got_second.history) == 4 and missing is None


def test_a_session_is_only_found_with_its_tenant(spec):
    mine, theirs = sample_state("s", tenant="aaaa", seed=1), sample_state("s", tenant="bbbb", seed=2)

    async def go():
        async with opened(spec) as store:
            await store.put(mine)
            await store.put(theirs)
            got = (await store.get("aaaa", "s"), await store.get("bbbb", "s"),
                   await store.get("cccc", "s"))
            listed = [s.tenant for s in await store.list("aaaa")], await store.list("cccc")
            held = await store.lease("aaaa", "s")
            other_tenant = await store.lease("bbbb", "s")  # same id, another tenant: not held
            deleted = await store.delete("cccc", "s")
            await store.delete("aaaa", "s")
            return got, listed, held, other_tenant, deleted, await store.get("bbbb", "s")

    (a, b, c), (listed, nobody), held, other_tenant, deleted, left = run(go())
    assert_same(a, mine)
    assert_same(b, theirs)
    assert c is None and listed == ["aaaa"] and nobody == []
    assert held is not None and other_tenant is not None
    assert deleted is None  # another tenant cannot delete it either
    assert_same(left, theirs)


def test_delete_returns_the_state_and_forgets_it(spec):
    state = sample_state("s")

    async def go():
        async with opened(spec) as store:
            await store.put(state)
            deleted = await store.delete("t", "s")
            again = await store.delete("t", "s")
            return (deleted, again, await store.get("t", "s"), await store.list("t"),
                    await store.count(), store.counters.deleted)

    deleted, again, got, listed, count, counted = run(go())
    assert_same(deleted, state)
    assert again is None and got is None and listed == [] and count == 0 and counted == 1


def test_list_gives_one_tenants_sessions_least_recently_used_first(spec):
    async def go():
        async with opened(spec) as store:
            for tenant, sid in [("t", "a"), ("t", "b"), ("u", "x"), ("t", "c")]:
                await store.put(sample_state(sid, tenant=tenant))
            await store.put(sample_state("a", seed=9))  # a turn on a: most recent now
            return await store.list("t"), await store.list("u"), await store.count()

    mine, theirs, count = run(go())
    assert [s.id for s in mine] == ["b", "c", "a"] and mine[-1].head.turn_id == "turn-9-3"
    assert [(s.tenant, s.id) for s in theirs] == [("u", "x")] and count == 4


def test_a_lease_is_exclusive_until_released(spec):
    async def go():
        async with opened(spec) as store:
            first = await store.lease("t", "s")
            second = await store.lease("t", "s")
            other = await store.lease("t", "other")
            await store.release(first)
            third = await store.lease("t", "s")
            return first, second, other, third

    first, second, other, third = run(go())
    assert first is not None and second is None and other is not None
    assert third is not None and third.token != first.token


def test_releasing_another_holders_lease_is_a_no_op(spec):
    async def go():
        async with opened(spec, lease_seconds=0.5) as store:
            first = await store.lease("t", "s")
            await store.release(Lease("t", "s", "not-the-token", first.expires))
            still_held = await store.lease("t", "s")
            await asyncio.sleep(0.7)
            second = await store.lease("t", "s")  # first expired: taken over
            await store.release(first)  # the old holder comes back late
            return still_held, second, await store.lease("t", "s")

    still_held, second, after_stale_release = run(go())
    assert still_held is None and second is not None and after_stale_release is None


def test_a_crashed_holders_lease_expires_by_itself(spec):
    async def go():
        async with opened(spec, lease_seconds=0.5) as store:
            held = await store.lease("t", "s")  # never released
            taken = await store.lease("t", "s")
            await asyncio.sleep(0.7)
            return held, taken, await store.lease("t", "s")

    held, taken, later = run(go())
    assert held is not None and taken is None and later is not None


def test_the_cap_drops_the_least_recently_used_and_reports_it(spec):
    drops = []
    states = {sid: sample_state(sid, seed=i) for i, sid in enumerate("abcde")}

    async def go():
        async with opened(spec, drops, max_sessions=3) as store:
            for sid in "abc":
                await store.put(states[sid])
            await store.put(states["a"])  # a turn on a: b is now the least recently used
            await store.put(states["d"])  # over the cap: b goes
            after_d = sorted(s.id for s in await store.list("t"))
            lease = await store.lease("t", "c")  # c is next, but busy: a goes instead
            await store.put(states["e"])
            await store.release(lease)
            return after_d, sorted(s.id for s in await store.list("t")), await store.count(), \
                store.counters.dropped_lru

    after_d, after_e, count, counted = run(go())
    assert after_d == ["a", "c", "d"] and after_e == ["c", "d", "e"] and count == 3
    assert [(s.id, reason) for s, reason in drops] == [("b", "lru"), ("a", "lru")]
    assert_same(drops[0][0], states["b"])  # reported with its state: the engine frees its pins
    assert counted == 2


def test_idle_sessions_expire_after_the_ttl(spec):
    """Real time. Memory and SQLite keep a session whose lease is alive and
    report each expiry; in Redis the key expires inside Redis, unreported."""
    drops = []
    ttl, step = 2.0, 1.1
    idle = sample_state("idle")

    async def go():
        async with opened(spec, drops, ttl=ttl) as store:
            for state in (idle, sample_state("busy"), sample_state("held")):
                await store.put(state)
            lease = await store.lease("t", "held")
            await asyncio.sleep(step)
            await store.put(sample_state("busy", seed=5))  # a turn: last_used is now
            await asyncio.sleep(step)
            got = {sid: await store.get("t", sid) for sid in ("idle", "busy", "held")}
            await store.release(lease)
            return got, await store.count(), store.counters.expired

    got, count, counted = run(go())
    assert got["idle"] is None and got["busy"] is not None
    if kind_of(spec) == "redis":
        assert got["held"] is None and drops == [] and counted == 0 and count == 1
    else:
        assert got["held"] is not None and count == 2 and counted == 1
        assert [(s.id, reason) for s, reason in drops] == [("idle", "expired")]
        assert_same(drops[0][0], idle)


def test_make_store_refuses_an_unknown_store():
    with pytest.raises(ValueError, match="memory, sqlite, sqlite:PATH, redis://"):
        make_store("postgres://x")


def test_the_redis_store_refuses_a_tenant_that_could_alias_another(redis_url):
    async def go():
        async with opened(redis_url) as store:
            with pytest.raises(ValueError, match="without ':'"):
                await store.get("a:b", "c")
    run(go())


# ---- two processes ---------------------------------------------------------------------

def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    """A child Python process running `child_main(args)` from this file."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_stores; "
            "test_stores.child_main(sys.argv[1:])")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def line_reader(proc: subprocess.Popen):
    """`next_line()` of the child's stdout, failing after CHILD_TIMEOUT_S."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def next_line() -> str:
        try:
            line = lines.get(timeout=CHILD_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError("the child process said nothing") from None
        assert line is not None, f"the child ended early: {proc.wait()} {proc.stderr.read()}"
        return line.rstrip("\n")

    return next_line


def test_two_processes_share_one_store(shared_spec):
    """A child writes and holds a lease while the parent reads; each sees the other's writes."""
    from_parent = sample_state("from-parent", seed=7)
    run(_put(shared_spec, from_parent))
    child = spawn("share", shared_spec)
    try:
        next_line = line_reader(child)
        seen_by_child = json.loads(next_line())
        written = [json.loads(next_line()) for _ in range(3)]
        assert next_line() == "ready"

        async def while_child_holds():
            async with opened(shared_spec) as store:
                got = [await store.get("t", d["id"]) for d in written]
                return got, await store.lease("t", "held"), await store.count()

        got, lease_while_held, count = run(while_child_holds())
        child.stdin.write("go\n")
        child.stdin.flush()
        assert next_line() == "released"
        assert child.wait(timeout=CHILD_TIMEOUT_S) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert seen_by_child == from_parent.to_dict()
    assert [s.to_dict() for s in got] == written and count == 4
    assert lease_while_held is None

    async def after():
        async with opened(shared_spec) as store:
            return await store.lease("t", "held")

    assert run(after()) is not None


def test_processes_taking_turns_on_shared_sessions_never_lose_one(shared_spec):
    """Two processes race for 1.5 s over two sessions, each turn a read, an
    increment and a write under the session's lease: every increment a
    process made is in the store (the leases never overlapped)."""
    children = [spawn("race", shared_spec, who) for who in ("a", "b")]
    try:
        readers = [line_reader(c) for c in children]
        assert [next_line() for next_line in readers] == ["ready", "ready"]
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        done = [json.loads(next_line()) for next_line in readers]
        assert [c.wait(timeout=CHILD_TIMEOUT_S) for c in children] == [0, 0]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    async def stored_turns():
        async with opened(shared_spec) as store:
            return sum([(await store.get("t", sid)).head.turns for sid in ("r0", "r1")])

    assert sum(d["turns"] for d in done) == run(stored_turns()) > 0
    assert sum(d["refused"] for d in done) > 0  # they did contend


def test_processes_opening_a_fresh_sqlite_file_at_once_all_open_it(tmp_path):
    """Three processes open one new file at the same instant, 80 times over:
    each opening succeeds (SQLite refuses all but one switch to WAL without
    waiting; CI saw a child die of "database is locked")."""
    child = spawn("open-race", str(tmp_path), "80")
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, err
    assert json.loads(out) == {"opened": 240, "failed": []}


def test_sqlite_without_a_path_lives_under_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SIR_VLLM_CACHE", str(tmp_path))
    store = make_store("sqlite")
    assert store.path == tmp_path / "sessions.sqlite3"

    async def go():
        await store.put(sample_state("s"))
        await store.close()

    run(go())
    assert store.path.exists()


async def _put(spec: str, state: SessionState) -> None:
    async with opened(spec) as store:
        await store.put(state)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_crash_between_the_answer_and_the_write_leaves_the_previous_turn(shared_spec, point,
                                                                          tmp_path):
    """A child runs turns through the service and dies at the hook on its third
    put: the store holds turn 2's state whole, its lease expires, and a new
    process continues the session from it as if nothing had happened."""
    child = spawn("turns", shared_spec, str(len(TURNS)), env={FAULT_ENV: f"{point}:3"})
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == FAULT_EXIT_CODE, err
    committed = [json.loads(line) for line in out.splitlines()]
    assert [d["head"]["turns"] for d in committed] == [1, 2]

    async def recover():
        async with opened(shared_spec, lease_seconds=CRASH_LEASE_S) as store:
            stored, count = await store.get("t", "s"), await store.count()
            listed = await store.list("t")
            lease_of_the_dead = await store.lease("t", "s")
            deadline = time.monotonic() + CRASH_LEASE_S + 5
            while (lease := await store.lease("t", "s")) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert lease is not None, "the dead child's lease never expired"
            await store.release(lease)
            service, engine = service_on(store)
            _, turn = await complete(service, comp("s", TURNS[2]))
            return stored, count, listed, lease_of_the_dead, lease, engine, turn.session

    stored, count, listed, dead_lease, lease, engine, session = run(recover())
    assert stored.to_dict() == committed[-1] and count == 1
    assert [s.to_dict() for s in listed] == [committed[-1]]
    assert dead_lease is None and lease is not None  # held by the dead child, then expired
    if kind_of(shared_spec) == "sqlite":
        db = sqlite3.connect(shared_spec.split(":", 1)[1])
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()

    ref_service, ref_engine = service_on(open_store("memory"))

    async def reference():
        for prompt in TURNS[:3]:
            _, turn = await complete(ref_service, comp("s", prompt))
        return turn.session

    ref_session = run(reference())
    assert engine.bodies[0]["prompt"] == ref_engine.bodies[2]["prompt"]
    # the new process's engine holds no pins: it recomputes what the old one loaded
    assert session["recomputed_tokens"] == ref_session["loaded_tokens"] > 0
    assert {**session, "loaded_tokens": 0, "recomputed_tokens": 0} == \
        {**ref_session, "loaded_tokens": 0, "recomputed_tokens": 0}


# ---- the service on every backend ---------------------------------------------------------

@pytest.fixture(scope="module")
def renderer(bundled_model):
    from transformers import AutoTokenizer

    from sir_vllm.chat import ChatRenderer

    return ChatRenderer(AutoTokenizer.from_pretrained(str(bundled_model)))


def service_on(store, renderer=None):
    engine = FakeEngine()
    service = SessionService(store, engine, ServiceConfig(POLICY, 4), renderer=lambda: renderer)
    store.on_drop = service.on_store_drop
    return service, engine


def comp(sid, prompt, max_tokens=8, **kw):
    return TurnRequest(api="completions", tenant="t", session_id=sid, prompt=prompt,
                       max_tokens=max_tokens, **kw)


def chat(sid, messages, max_tokens=6):
    return TurnRequest(api="chat", tenant="t", session_id=sid, messages=messages,
                       max_tokens=max_tokens)


async def complete(service, req):
    async with service.turn(req) as turn:
        out = await turn.complete()
        return out, turn


def comparable(state: SessionState) -> dict:
    """A state without what is random per run (engine key, turn ids, times)."""
    d = state.to_dict()
    for field in ("key", "created", "last_used"):
        d.pop(field)
    for snap in (d["head"], *d["history"]):
        snap.pop("turn_id")
    return d


async def service_script(spec: str, renderer) -> dict:
    """Completions and chat turns (eviction, regenerate, edit, peek), a session
    cap that drops one, a delete: everything the run shows, comparably."""
    async with opened(spec, max_sessions=3) as store:
        service, engine = service_on(store, renderer)
        sessions, ids = [], {}

        async def turn(req):
            out, t = await complete(service, req)
            sessions.append(t.session)
            ids[t.state.key] = t.state.id
            return out["choices"][0]["text"]

        for prompt in TURNS[:3]:
            await turn(comp("c1", prompt))
        history = []
        for text in ["Hi, I am Ada.", "I like tea.", "Tell me a joke."]:
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": await turn(chat("x", list(history)))})
        await turn(chat("x", history[:-1]))  # regenerate: one turn back
        await turn(chat("x", [*history[:3], {"role": "user", "content": "I like coffee."}]))  # edit
        await turn(comp("c2", TURNS[0]))
        await turn(comp("c3", TURNS[1]))  # the cap: c1 goes
        await turn(comp("c3", [5, 6], max_tokens=0, peek=True))
        await service.delete("t", "c2")
        await asyncio.sleep(0)  # the background pin drops
        return {
            "engine": [(b["prompt"], b["max_tokens"], b["kv_transfer_params"]["sir_session"]["keep"])
                       for b in engine.bodies],
            "sessions": sessions,
            "states": {s.id: comparable(s) for s in await store.list("t")},
            "dropped_pins": sorted(ids[k] for k in engine.dropped),
            "gone": [await store.get("t", sid) for sid in ("c1", "c2")],
            "counters": (store.counters.dropped_lru, store.counters.deleted),
        }


def test_the_service_gives_the_same_turns_on_every_backend(shared_spec, renderer):
    want = run(service_script("memory", renderer))
    got = run(service_script(shared_spec, renderer))
    assert want["dropped_pins"] == ["c1", "c2"] and want["gone"] == [None, None]
    assert sorted(want["states"]) == ["c3", "x"] and want["counters"] == (1, 1)
    assert [s.get("rolled_back_turns") for s in want["sessions"][3:8]] == [0, 0, 0, 1, 2]
    assert got == want


# ---- the child process's side ----------------------------------------------------------------

def child_main(argv: list[str]) -> None:
    """Entry point of the processes `spawn` starts: `share SPEC`, `turns SPEC N`,
    `race SPEC WHO` or `open-race FOLDER ROUNDS`."""
    command, spec, *rest = argv
    if command == "open-race":
        return child_open_race(spec, *rest)
    run({"share": child_share, "turns": child_turns, "race": child_race}[command](spec, *rest))


def child_open_race(folder: str, rounds: str, openers: int = 3) -> None:
    """Per round, `openers` forked processes open one new sqlite file at a
    signal and put a state; prints how many opened and the errors of the
    others. (An Event wakes them together; a Barrier releases them one by
    one, too far apart to race.)"""
    import multiprocessing
    import traceback

    fork = multiprocessing.get_context("fork")  # this child has no threads yet

    def open_and_put(path: str, ready, go) -> None:
        store, state = open_store(f"sqlite:{path}"), sample_state("s")
        loop = asyncio.new_event_loop()
        loop.run_until_complete(asyncio.sleep(0))  # the loop is ready before the signal
        ready.release()
        go.wait()
        try:
            loop.run_until_complete(store.put(state))
            loop.run_until_complete(store.close())
        except Exception:
            with open(f"{path}.{os.getpid()}.err", "w") as f:
                f.write(traceback.format_exc(limit=1))
            os._exit(1)

    opened_ok = 0
    for r in range(int(rounds)):
        ready, go = fork.Semaphore(0), fork.Event()
        procs = [fork.Process(target=open_and_put, args=(f"{folder}/{r}.sqlite3", ready, go))
                 for _ in range(openers)]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.acquire()
        go.set()
        for proc in procs:
            proc.join()
        opened_ok += sum(proc.exitcode == 0 for proc in procs)
    failed = [p.read_text() for p in sorted(Path(folder).glob("*.err"))]
    print(json.dumps({"opened": opened_ok, "failed": failed}), flush=True)


async def child_share(spec: str) -> None:
    async with opened(spec) as store:
        print(json.dumps((await store.get("t", "from-parent")).to_dict()), flush=True)
        for i in (1, 2, 3):
            state = sample_state(f"s{i}", seed=i)
            await store.put(state)
            print(json.dumps(state.to_dict()), flush=True)
        lease = await store.lease("t", "held")
        print("ready" if lease else "no lease", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await store.release(lease)
    print("released", flush=True)


async def child_turns(spec: str, n: str) -> None:
    async with opened(spec, lease_seconds=CRASH_LEASE_S) as store:
        service, _ = service_on(store)
        for prompt in TURNS[: int(n)]:
            _, turn = await complete(service, comp("s", prompt))
            print(json.dumps(turn.state.to_dict()), flush=True)


async def child_race(spec: str, who: str, seconds: float = 1.5) -> None:
    turns = refused = 0
    async with opened(spec, lease_seconds=30) as store:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sid = f"r{(turns + refused) % 2}"
            lease = await store.lease("t", sid)
            if lease is None:
                refused += 1
                continue
            state = await store.get("t", sid)
            base = sample_state(sid, seed=turns)
            done = 0 if state is None else state.head.turns
            await store.put(replace(base, head=replace(base.head, turns=done + 1)))
            await store.release(lease)
            turns += 1
    print(json.dumps({"who": who, "turns": turns, "refused": refused}), flush=True)
