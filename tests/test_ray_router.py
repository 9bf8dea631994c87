"""The session-affine request router (sir_vllm/ray/router.py) with fake replicas, no engine.

Requests go through Ray Serve's own routing loop (`_choose_replica_for_request`:
choose_replicas, the queue-length probes, the matching of a chosen replica to
its request), then `on_request_routed`, as Serve's router calls it once the
replica accepted the request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from sir_vllm.ray.router import SessionAffinityRouter
from sir_vllm.ray.session_table import SessionTable

DEPLOYMENT = DeploymentID(name="sir-vllm", app_name="sir-vllm")


class FakeReplica:
    """What a RequestRouter reads of a running replica; `queue_len` is what it reports."""

    def __init__(self, name: str, queue_len: int = 0, max_ongoing_requests: int = 100):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.queue_len = queue_len
        self.max_ongoing_requests = max_ongoing_requests
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids = set()
        self.routing_stats = {}
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_router(*replicas: FakeReplica, **kwargs) -> SessionAffinityRouter:
    router = SessionAffinityRouter(deployment_id=DEPLOYMENT,
                                   handle_source=DeploymentHandleSource.UNKNOWN,
                                   initial_backoff_s=0.001, max_backoff_s=0.005)
    router.initialize_state(**kwargs)
    router.update_replicas(list(replicas))
    return router


async def route(router: SessionAffinityRouter, session_id: str = "") -> str:
    """Route one request; returns the name of the replica that got it."""
    pr = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
        request_id=uuid.uuid4().hex, internal_request_id=uuid.uuid4().hex, session_id=session_id))
    replica = await asyncio.wait_for(router._choose_replica_for_request(pr), timeout=10)
    router.on_request_routed(pr, replica.replica_id, result=None)
    return replica.replica_id.unique_id


def run(coro):
    return asyncio.run(coro)


def test_a_session_stays_on_its_replica_whatever_the_load():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router(a, b)
        first = await route(router, "s1")
        busy, idle = (a, b) if first == "a" else (b, a)
        busy.queue_len, idle.queue_len = 50, 0  # load alone would pick the other one
        return first, [await route(router, "s1") for _ in range(20)]

    first, later = run(go())
    assert later == [first] * 20


def test_new_sessions_go_to_the_replica_with_the_fewest():
    async def go():
        router = make_router(*(FakeReplica(n) for n in "abcd"))
        return [await route(router, f"s{i}") for i in range(64)]

    placed = Counter(run(go()))
    assert placed == {"a": 16, "b": 16, "c": 16, "d": 16}


def test_a_burst_of_new_sessions_spreads_evenly():
    async def go():
        router = make_router(*(FakeReplica(n) for n in "abc"))
        return await asyncio.gather(*(route(router, f"burst-{i}") for i in range(30)))

    assert Counter(run(go())) == {"a": 10, "b": 10, "c": 10}


def test_ties_in_sessions_go_to_the_least_loaded():
    async def go():
        a, b = FakeReplica("a", queue_len=9), FakeReplica("b", queue_len=1)
        router = make_router(a, b)
        await route(router)  # sessionless: probes both, fills the queue-length cache
        return await route(router, "fresh")

    assert run(go()) == "b"


def test_requests_without_a_session_go_by_load():
    async def go():
        a, b = FakeReplica("a", queue_len=7), FakeReplica("b", queue_len=0)
        router = make_router(a, b)
        got = [await route(router) for _ in range(10)]
        return got, len(router.sessions)

    got, remembered = run(go())
    assert got == ["b"] * 10  # power of two choices: the shorter queue of the two
    assert remembered == 0


def test_adding_a_replica_moves_no_session_and_takes_the_new_ones():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router(a, b)
        before = {f"s{i}": await route(router, f"s{i}") for i in range(10)}
        router.update_replicas([a, b, FakeReplica("c")])
        after = {sid: await route(router, sid) for sid in before}
        fresh = [await route(router, f"new{i}") for i in range(6)]
        return before, after, fresh

    before, after, fresh = run(go())
    assert after == before
    assert Counter(before.values()) == {"a": 5, "b": 5}
    assert fresh[:5] == ["c"] * 5  # the new replica fills up to the others' count first
    assert Counter(fresh) == {"c": 5, "a": 1} or Counter(fresh) == {"c": 5, "b": 1}


@pytest.mark.parametrize("how", ["died", "scaled-in"])
def test_a_gone_replicas_sessions_spread_over_the_others(how):
    async def go():
        replicas = [FakeReplica(n) for n in "abc"]
        router = make_router(*replicas)
        before = {f"s{i}": await route(router, f"s{i}") for i in range(12)}
        if how == "died":
            router.on_replica_actor_died(replicas[0].replica_id)
        else:
            router.update_replicas(replicas[1:])
        after = {sid: await route(router, sid) for sid in before}
        return before, after

    before, after = run(go())
    moved = {sid: after[sid] for sid, was in before.items() if was == "a"}
    assert len(moved) == 4 and Counter(moved.values()) == {"b": 2, "c": 2}
    assert all(after[sid] == was for sid, was in before.items() if was != "a")


def test_a_session_waits_for_room_on_its_replica_rather_than_move():
    async def go():
        a, b = FakeReplica("a", max_ongoing_requests=2), FakeReplica("b", max_ongoing_requests=2)
        router = make_router(a, b)
        home = await route(router, "s")
        mine = a if home == "a" else b
        mine.queue_len = 2  # full
        router.replica_queue_len_cache.update(mine.replica_id, 2)
        waiting = asyncio.ensure_future(route(router, "s"))
        await asyncio.sleep(0.2)
        was_waiting = not waiting.done()
        mine.queue_len = 1
        return home, was_waiting, await waiting

    home, was_waiting, later = run(go())
    assert was_waiting and later == home


def test_a_new_session_skips_a_full_replica():
    async def go():
        a = FakeReplica("a", queue_len=2, max_ongoing_requests=2)
        b = FakeReplica("b", max_ongoing_requests=2)
        router = make_router(a, b)
        for i in range(3):  # b now holds more sessions than a: a is first in line, but full
            await route(router, f"on-b-{i}")
        got = await route(router, "fresh")
        return got, router.sessions.owner("fresh").unique_id

    assert run(go()) == ("b", "b")


def test_router_kwargs_reach_its_table():
    async def go():
        return make_router(FakeReplica("a"), session_ttl_s=60.0, max_sessions=5).sessions

    table = run(go())
    assert (table.ttl_s, table.max_sessions) == (60.0, 5)


# -- the table ------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_table_forgets_idle_sessions_after_the_ttl():
    clock = Clock()
    table = SessionTable(ttl_s=10, clock=clock)
    table.assign("old", "a")
    clock.now += 6
    table.assign("recent", "a")
    clock.now += 5
    assert table.owner("old") is None and table.owner("recent") == "a"
    assert table.count("a") == 1


def test_table_ttl_zero_never_forgets():
    clock = Clock()
    table = SessionTable(ttl_s=0, clock=clock)
    table.assign("s", "a")
    clock.now += 10 ** 9
    assert table.owner("s") == "a"


def test_table_keeps_the_most_recently_used_within_its_cap():
    table = SessionTable(max_sessions=2, clock=Clock())
    table.assign("s1", "a")
    table.assign("s2", "b")
    table.assign("s1", "a")  # used again: s2 is now the least recently used
    table.assign("s3", "b")
    assert (table.owner("s1"), table.owner("s2"), table.owner("s3")) == ("a", None, "b")
    assert table.counts() == {"a": 1, "b": 1}


def test_table_moves_a_session_between_counts():
    table = SessionTable(clock=Clock())
    table.assign("s", "a")
    table.assign("s", "b")
    assert table.counts() == {"b": 1} and table.forget_owner("b") == 1 and len(table) == 0


def test_table_refuses_nonsense_limits():
    with pytest.raises(ValueError, match="max_sessions"):
        SessionTable(max_sessions=0)
    with pytest.raises(ValueError, match="ttl_s"):
        SessionTable(ttl_s=-1)
