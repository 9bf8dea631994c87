"""Prometheus metrics (issue 15): the session layer's (`server.metrics`) and the
connector's (`connector.metrics`), first without a server (each piece on its
own, vLLM's own stat classes driving ours, multiprocess mode), then one real
`vllm serve` of the tiny model: a scripted conversation, then `/metrics`
checked value by value."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sir_vllm.connector.metrics import (COMPACTIONS, OFFLOADED_TOKENS, PINS_DROPPED,
                                        RECOMPUTED_TOKENS, RESTORED_TOKENS, TURNS_HELD,
                                        CompactionTimer, SirConnectorStats)
from sir_vllm.connector.protocol import EngineQuery, TurnParams, TurnReply
from sir_vllm.policy import make_policy
from sir_vllm.server.metrics import (ABORTED, BAD_REQUEST, CONFLICT, ERROR, OK, OUTCOMES, REBUILT,
                                     ROLLED_BACK, SessionMetrics, turn_outcome)
from sir_vllm.sessions import (MemoryStore, ServiceConfig, SessionError, SessionService,
                               StoreLimits, TurnRequest)
from sir_vllm.sessions.engine import EngineError, EngineStreamError
from sir_vllm.sessions.state import SessionState

from api_processes import REPLICA, bounded_reader, clients_on_each_process, stall_bound, stalled
from fake_block_pool import Blocks, Pool
from fake_engine import FakeEngine

MODEL = "m"
POLICY = make_policy("sirllm", start_size=4, entropy_size=40, recent_size=16)  # budget 60


def value(registry, name, **labels):
    """A sample's value (0 when the series does not exist)."""
    return registry.get_sample_value(name, labels) or 0.0


def turns(registry, outcome):
    return value(registry, "vllm:sir_turns_total", model_name=MODEL, outcome=outcome)


# ---- the session layer (server.metrics) --------------------------------------

def test_a_turn_is_counted_by_how_it_ended():
    assert turn_outcome(None, {"rolled_back_turns": 0, "rebuilt": False}) == OK
    assert turn_outcome(None, {"id": "s"}) == OK  # a completions turn: no resolution
    assert turn_outcome(None, {"rolled_back_turns": 1, "rebuilt": False}) == ROLLED_BACK
    assert turn_outcome(None, {"rolled_back_turns": 0, "rebuilt": True}) == REBUILT
    assert turn_outcome(None, None) == ABORTED  # ran, committed nothing: the stream broke off
    assert turn_outcome(SessionError(400, "kv_policy: ..."), None) == BAD_REQUEST
    assert turn_outcome(EngineError(400, b"context length"), None) == BAD_REQUEST  # vLLM's 400
    assert turn_outcome(SessionError(409, "in progress"), None) == CONFLICT
    assert turn_outcome(EngineError(500, b"engine died"), None) == ABORTED
    assert turn_outcome(EngineStreamError({"error": "x"}), None) == ABORTED
    assert turn_outcome(asyncio.CancelledError(), None) == ABORTED
    assert turn_outcome(RuntimeError("a bug"), None) == ERROR
    # committed, then sending the answer failed (the client left): the session moved on
    assert turn_outcome(asyncio.CancelledError(), {"rolled_back_turns": 0}) == OK
    assert turn_outcome(OSError("gone"), {"rolled_back_turns": 0, "rebuilt": True}) == REBUILT


def make_service(registry, limits=None, clock=None):
    metrics = SessionMetrics(MODEL, registry=registry)
    inner = MemoryStore(limits, clock=clock) if clock else MemoryStore(limits)
    store = metrics.metered(inner)
    engine = FakeEngine()
    service = SessionService(store, engine, ServiceConfig(POLICY), renderer=lambda: None)
    store.on_drop = service.on_store_drop  # as the middleware sets it: on the wrapper
    return service, metrics, inner, engine


def comp(sid, prompt, max_tokens=8, **kw):
    return TurnRequest(api="completions", tenant="t", session_id=sid, prompt=prompt,
                       max_tokens=max_tokens, **kw)


async def metered_turn(service, metrics, req):
    """A turn inside the meter, as the middleware runs it; the turn, or the error."""
    try:
        with metrics.meter() as meter:
            async with service.turn(req) as turn:
                meter.turn = turn
                await turn.complete()
                return turn
    except (SessionError, EngineError) as e:
        return e


def test_committed_turns_count_their_tokens_and_failed_ones_only_their_outcome():
    reg = CollectorRegistry()
    service, metrics, _, engine = make_service(reg)
    sessions = []

    async def go():
        for prompt in (list(range(10, 40)), list(range(40, 60)), list(range(60, 80))):
            sessions.append((await metered_turn(service, metrics, comp("s", prompt))).session)
        engine.pins.clear()  # the engine lost the pins: the next turn recomputes
        sessions.append((await metered_turn(service, metrics, comp("s", [5, 6, 7]))).session)
        peek = await metered_turn(service, metrics, comp("s", [1, 2], max_tokens=0, peek=True))
        engine.fail_with = EngineError(500, b"engine died")
        failed = await metered_turn(service, metrics, comp("s", [3]))
        engine.fail_with = None
        async with service.turn(comp("s", [4])):  # a request in progress
            busy = await metered_turn(service, metrics, comp("s", [4]))
        return peek, failed, busy

    peek, failed, busy = asyncio.run(go())
    assert peek.session["peek"] and failed.status == 500 and busy.status == 409
    assert turns(reg, OK) == 5 and turns(reg, ABORTED) == 1 and turns(reg, CONFLICT) == 1
    assert sum(turns(reg, o) for o in OUTCOMES) == 7
    evicted = [b["evicted_tokens"] - a["evicted_tokens"]
               for a, b in zip([{"evicted_tokens": 0}, *sessions], sessions)]
    assert sum(evicted) > 0 and sessions[-1]["recomputed_tokens"] > 0  # the checks check something
    for metric, key in (("kept", "retained_tokens"), ("loaded", "loaded_tokens"),
                        ("recomputed", "recomputed_tokens")):  # the peek's tokens are not counted
        assert value(reg, f"vllm:sir_tokens_{metric}_total", model_name=MODEL) == \
            sum(s[key] for s in sessions), metric
    assert value(reg, "vllm:sir_tokens_evicted_total", model_name=MODEL) == sum(evicted)


def test_the_metered_store_times_every_operation_and_counts_what_it_drops():
    reg = CollectorRegistry()
    now = [1000.0]
    service, metrics, inner, engine = make_service(reg, StoreLimits(max_sessions=2, ttl=60),
                                                   clock=lambda: now[0])

    def ops(op):
        return value(reg, "vllm:sir_store_operation_seconds_count", model_name=MODEL,
                     operation=op, backend="memory")

    async def go():
        for sid in "abc":  # c's put drops a, the least recently used
            await metered_turn(service, metrics, comp(sid, [1, 2, 3]))
        await asyncio.sleep(0)  # the background pin drop (on_drop reached the service)
        for sid in "bc":  # states carry the wall clock's time; the store reads its own
            object.__setattr__(await service.store.get("t", sid), "last_used", now[0])
        now[0] += 61  # b and c idle past the TTL; the next read expires them
        gone = await service.store.get("t", "b")
        await metered_turn(service, metrics, comp("d", [1, 2, 3]))
        await service.delete("t", "d")
        await metrics.refresh(service.store, SimpleNamespace(query=None))  # count, no engine
        return gone

    assert asyncio.run(go()) is None
    assert inner.counters.dropped_lru == 1 and inner.counters.expired == 2  # the backend's own
    assert inner.counters.deleted == 1 and len(engine.dropped) == 1 + 2 + 1
    dropped = {r: value(reg, "vllm:sir_sessions_dropped_total", model_name=MODEL, reason=r)
               for r in ("lru", "expired")}
    assert dropped == {"lru": 1, "expired": 2}
    assert value(reg, "vllm:sir_sessions_deleted_total", model_name=MODEL) == 1
    assert value(reg, "vllm:sir_sessions_live", model_name=MODEL) == 0
    # 4 turns and a delete took a lease each; 4 puts; 4 prepares + 3 reads above
    assert (ops("lease"), ops("release"), ops("put"), ops("get"), ops("delete"), ops("count")) == \
        (5, 5, 4, 7, 1, 1)
    assert value(reg, "vllm:sir_store_operation_seconds_sum", model_name=MODEL, operation="put",
                 backend="memory") > 0
    assert service.store.name == "memory" and service.store.limits.max_sessions == 2


class StatsEngine:
    def __init__(self, stats=None, error=None):
        self.stats, self.error = stats, error

    async def query(self, command, argument=None):
        assert command == EngineQuery.STATS
        if self.error:
            raise self.error
        return self.stats


def test_the_gauges_are_read_when_scraped_and_keep_their_value_when_a_part_fails():
    reg = CollectorRegistry()
    metrics = SessionMetrics(MODEL, registry=reg)
    store = metrics.metered(MemoryStore())

    async def go():
        for sid in "ab":
            await store.put(SessionState(id=sid, tenant="t", key=sid, policy=POLICY))
        await metrics.refresh(store, StatsEngine({"pinned_sessions": 2, "pinned_blocks": 5,
                                                  "dropped_total": 9}))
        first = [value(reg, n, model_name=MODEL) for n in
                 ("vllm:sir_sessions_live", "vllm:sir_sessions_pinned", "vllm:sir_pinned_kv_blocks")]
        await store.delete("t", "a")
        await metrics.refresh(store, StatsEngine(error=RuntimeError("engine busy")))
        second = [value(reg, n, model_name=MODEL) for n in
                  ("vllm:sir_sessions_live", "vllm:sir_sessions_pinned", "vllm:sir_pinned_kv_blocks")]
        return first, second

    assert asyncio.run(go()) == ([2, 2, 5], [1, 2, 5])


def test_metrics_add_up_over_api_processes(tmp_path):
    """`--api-server-count N`: each process writes its own files under
    PROMETHEUS_MULTIPROC_DIR; vLLM's /metrics reads them all (MultiProcessCollector):
    counters and histograms summed, the gauges the most recent process's value."""
    from prometheus_client import multiprocess

    code = """if True:
        import asyncio, sys
        from sir_vllm.server.metrics import session_metrics
        m = session_metrics("m")
        assert session_metrics("other") is m  # one per process: a name registers once
        for _ in range(int(sys.argv[1])):
            m.count_turn("ok")
        m.count_turn("conflict")
        m.store_seconds.labels("m", "get", "sqlite").observe(0.002)
        m.sessions_live.set(int(sys.argv[2]))
    """
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for ok, live in ((3, 7), (2, 5)):  # the second process writes last
        subprocess.run([sys.executable, "-c", code, str(ok), str(live)], env=env, check=True,
                       timeout=120)
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(tmp_path))
    assert turns(reg, OK) == 5 and turns(reg, CONFLICT) == 2
    assert value(reg, "vllm:sir_store_operation_seconds_count", model_name=MODEL, operation="get",
                 backend="sqlite") == 2
    assert value(reg, "vllm:sir_sessions_live", model_name=MODEL) == 5


# ---- the connector (connector.metrics), through vLLM's own stat classes ---------

def test_connector_stats_merge_take_and_summarize():
    worker, scheduler = SirConnectorStats(), SirConnectorStats()
    assert worker.is_empty() and worker.take() is None
    worker.record_compaction(0.002, 40)
    scheduler.record_pins_dropped()
    scheduler.record_recomputed(17)
    scheduler.record_turn_held()
    scheduler.record_offloaded(24)
    scheduler.record_restored(20)
    step = worker.take().aggregate(scheduler.take()).aggregate(SirConnectorStats())
    assert worker.is_empty() and scheduler.is_empty()  # handed over once
    assert step.data == {COMPACTIONS: [[0.002, 40]], PINS_DROPPED: 1, RECOMPUTED_TOKENS: 17,
                         TURNS_HELD: 1, OFFLOADED_TOKENS: 24, RESTORED_TOKENS: 20}
    later = SirConnectorStats(data=json.loads(json.dumps(step.to_dict())))  # across processes
    later.aggregate(SirConnectorStats(data={COMPACTIONS: [[0.004, 20]], PINS_DROPPED: 0,
                                            RECOMPUTED_TOKENS: 0}))
    assert later.reduce() == {"Compactions": 2, "Avg compaction (ms)": 3.0,
                              "Max compaction (ms)": 4.0, "Compacted tokens": 60,
                              "Pins dropped": 1, "Recomputed tokens": 17, "Turns held": 1,
                              "Offloaded tokens": 24, "Restored tokens": 20}


def private(cls, registry):
    """A vLLM metric class that registers in `registry` (vLLM passes the classes in)."""
    return functools.partial(cls, registry=registry)


def test_vllms_stat_loggers_drive_the_connectors_metrics():
    """vLLM's Prometheus logger (`KVConnectorProm`) and log logger
    (`KVConnectorLogging`) find our connector class from kv_transfer_config and
    use its `build_prom_metrics` / `build_kv_connector_stats`."""
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorLogging,
                                                                       KVConnectorProm)

    from sir_vllm import vllm_adapter
    from sir_vllm.server.flags import kv_transfer_config

    reg = CollectorRegistry()

    class Prom(KVConnectorProm):  # vLLM's class, its metrics in a registry of this test
        _gauge_cls = private(Gauge, reg)
        _counter_cls = private(Counter, reg)
        _histogram_cls = private(Histogram, reg)

    config = SimpleNamespace(kv_transfer_config=vllm_adapter.kv_transfer_config(
        kv_transfer_config(POLICY)))
    prom = Prom(config, ["model_name", "engine"], {0: [MODEL, "0"], 1: [MODEL, "1"]})
    step = {COMPACTIONS: [[0.0004, 30], [0.003, 50]], PINS_DROPPED: 2, RECOMPUTED_TOKENS: 64,
            TURNS_HELD: 5, OFFLOADED_TOKENS: 256, RESTORED_TOKENS: 200}
    prom.observe(step, engine_idx=1)
    prom.observe({COMPACTIONS: [[0.00002, 8]], PINS_DROPPED: 0, RECOMPUTED_TOKENS: 0}, engine_idx=0)

    def at(name, engine="1", **labels):
        return value(reg, name, model_name=MODEL, engine=engine, **labels)

    assert at("vllm:sir_compaction_seconds_count") == 2
    assert at("vllm:sir_compaction_seconds_sum") == pytest.approx(0.0034)
    assert at("vllm:sir_compaction_seconds_bucket", le="0.0005") == 1
    assert at("vllm:sir_compaction_seconds_count", engine="0") == 1
    assert at("vllm:sir_compacted_tokens_total") == 80
    assert at("vllm:sir_pins_dropped_total") == 2 and at("vllm:sir_pins_dropped_total", "0") == 0
    assert at("vllm:sir_pin_miss_tokens_total") == 64
    assert at("vllm:sir_turns_held_total") == 5 and at("vllm:sir_turns_held_total", "0") == 0
    assert at("vllm:sir_offloaded_tokens_total") == 256 and at("vllm:sir_restored_tokens_total") == 200
    assert at("vllm:sir_restored_tokens_total", "0") == 0

    logging_ = KVConnectorLogging(config.kv_transfer_config)
    logging_.observe(step)
    logging_.observe({COMPACTIONS: [[0.001, 10]], PINS_DROPPED: 1, RECOMPUTED_TOKENS: 0})
    lines = []
    logging_.log(lambda fmt, *args: lines.append(fmt % args))
    assert lines == ["KV Transfer metrics: Compactions=3, Avg compaction (ms)=1.467, "
                     "Max compaction (ms)=3.0, Compacted tokens=90, Pins dropped=3, "
                     "Recomputed tokens=64, Turns held=5, Offloaded tokens=256, "
                     "Restored tokens=200"]


BS = 4


def request(rid, prompt, params, computed=0, output=(), max_tokens=0):
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(request_id=rid, prompt_token_ids=list(prompt),
                           num_prompt_tokens=len(prompt), max_tokens=max_tokens,
                           all_token_ids=list(prompt) + list(output), num_computed_tokens=computed,
                           kv_transfer_params=None if params is None else params.to_kv_transfer_params(),
                           skip_reading_prefix_cache=False, status=RequestStatus.FINISHED_STOPPED)


def test_the_scheduler_reports_pins_dropped_and_tokens_recomputed_once():
    from sir_vllm.connector.connector import SirKVConnector
    from sir_vllm.connector.scheduler import SessionScheduler

    sched = SessionScheduler(SimpleNamespace(cache_config=SimpleNamespace(block_size=BS)),
                             install_utility=False)
    sched.block_pool = Pool(4)
    first = request("a1", range(10, 17), TurnParams(key="A", turn="t1", old_len=0), computed=8,
                    output=[17])
    sched.on_new_request(first)
    sched.request_finished(first, [0, 1])  # A pins 2 of the 4 blocks
    assert sched.take_stats() is None
    big = request("x", range(12), None, max_tokens=4)  # 16 tokens: the whole pool
    assert sched.get_num_new_matched_tokens(big, 0) == (0, False)
    assert "A" not in sched.pinned
    again = request("a2", [*range(10, 18), 99], TurnParams(key="A", turn="t2", old_len=8,
                                                           expect="t1"), computed=9, output=[5])
    sched.on_new_request(again)
    assert sched.get_num_new_matched_tokens(again, 0) == (0, False)  # the pins are gone
    sched.update_state_after_alloc(again, Blocks([2, 3]), 0)
    assert sched.request_finished(again, [2, 3])[1] == TurnReply(pinned=9, recomputed=8) \
        .to_kv_transfer_params()
    connector = object.__new__(SirKVConnector)  # the connector's one hook, scheduler role
    connector._scheduler, connector._worker = sched, None
    stats = connector.get_kv_connector_stats()
    assert stats.data == {COMPACTIONS: [], PINS_DROPPED: 1, RECOMPUTED_TOKENS: 8, TURNS_HELD: 0,
                          OFFLOADED_TOKENS: 0, RESTORED_TOKENS: 0}  # no host tier: nothing saved
    assert connector.get_kv_connector_stats() is None
    assert sched.handle_query(EngineQuery.STATS)["dropped_total"] == 1


class FakeEvent:
    """A CUDA timing event's interface: the time it was recorded at, on a fake clock."""

    def __init__(self, clock, log):
        self.clock, self.log, self.at = clock, log, None

    def record(self):
        self.at = self.clock[0]

    def synchronize(self):
        self.log.append("synchronize")

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3  # ms, as torch.cuda.Event


def test_compaction_time_is_the_devices_and_reported_once():
    clock = [0.0]
    host = CompactionTimer(clock=lambda: clock[0])  # CPU pages: the copy is done on return
    started = host.start()
    clock[0] = 0.004
    host.stop(started, 12)
    assert host.take().data[COMPACTIONS] == [[0.004, 12]] and host.take() is None

    log = []
    device = CompactionTimer(events=lambda: FakeEvent(clock, log))  # CUDA: events on the stream
    for tokens, seconds in ((30, 0.0002), (10, 0.0001)):
        started = device.start()
        clock[0] += seconds
        device.stop(started, tokens)
    assert log == []  # nothing waited for at launch
    got = device.take().data[COMPACTIONS]
    assert [n for _, n in got] == [30, 10] and [round(s, 6) for s, _ in got] == [0.0002, 0.0001]
    assert log == ["synchronize", "synchronize"] and device.take() is None


@pytest.mark.parametrize("first", [True, False])
def test_only_the_first_worker_times_compactions(monkeypatch, first):
    """Every tensor-parallel rank compacts its own heads of the same job: one reports it."""
    import torch

    from sir_vllm import vllm_adapter
    from sir_vllm.connector.metrics import cuda_events
    from sir_vllm.connector.worker import SessionWorker

    assert vllm_adapter.first_worker()  # no parallel groups in this process
    assert cuda_events(torch.device("cpu")) is None
    monkeypatch.setattr(vllm_adapter, "first_worker", lambda: first)
    worker = SessionWorker(vllm_config=None)
    worker.register_kv_caches({"model.layers.0.self_attn.attn": torch.zeros(2, 2, 4, 8)})
    worker._rope = object()  # no job here rotates: the copy never reads it
    worker.start_load_kv(SimpleNamespace(loads=[]))
    assert (worker.timer is not None) == first and worker.take_stats() is None


# ---- real servers: a session's turns, then /metrics --------------------------

def scrape(url) -> dict:
    """/metrics as {(sample name, sorted labels without model_name/engine): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=60).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def sample(page: dict, name: str, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def compaction_lines(log_path) -> list[float]:
    """The worker's log line per load job (for humans): its host-clock ms."""
    return [float(ms) for ms in re.findall(r"sir-vllm: compaction req=\S+ .* ms=([\d.]+)",
                                           log_path.read_text())]


def test_one_api_process_adds_them_to_vllms_own_registry(session_server):
    """Without --api-server-count vLLM's /metrics is prometheus_client's default
    registry: ours are on the same page as vLLM's own and count a session's turns."""
    from conftest import SERVED_NAME

    url, sid = session_server.url, f"metrics-{uuid.uuid4().hex}"
    before, logged = scrape(url), len(compaction_lines(session_server.log_path))
    sessions = []
    for prompt in ("My name is Ada and I like green tea. " * 12, " What do I like?"):  # 2nd evicts
        r = httpx.post(url + "/v1/completions", timeout=300, json={
            "model": SERVED_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "session_id": sid})
        assert r.status_code == 200, r.text
        sessions.append(r.json()["session"])
    assert httpx.delete(f"{url}/v1/sessions/{sid}", timeout=60).status_code == 200
    after = scrape(url)

    def grew(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert ("vllm:num_requests_running", ()) in after  # vLLM's own, on the same page
    assert grew("vllm:sir_turns_total", outcome=OK) == 2
    assert sum(grew("vllm:sir_turns_total", outcome=o) for o in OUTCOMES) == 2
    for metric, key in (("kept", "retained_tokens"), ("loaded", "loaded_tokens"),
                        ("recomputed", "recomputed_tokens")):
        assert grew(f"vllm:sir_tokens_{metric}_total") == sum(s[key] for s in sessions), metric
    # a first turn is not bounded by the budget: the second evicts, and loads the first's KV
    assert sessions[0]["evicted_tokens"] == 0
    assert sessions[1]["evicted_tokens"] > 0 and sessions[1]["loaded_tokens"] > 0
    assert grew("vllm:sir_tokens_evicted_total") == sessions[1]["evicted_tokens"]
    assert grew("vllm:sir_sessions_deleted_total") == 1
    assert grew("vllm:sir_store_operation_seconds_count", operation="put", backend="sqlite") == 2
    jobs = len(compaction_lines(session_server.log_path)) - logged
    assert jobs >= 1 and grew("vllm:sir_compaction_seconds_count") == jobs  # the 2nd turn's load


# One module-scoped server for the scripted conversation: a pool of 4 blocks
# (pins are dropped), at most 2 sessions, a TTL, and two API processes
# (Prometheus multiprocess mode: every figure is a sum over both).
BLOCK = 128
BYTES_PER_TOKEN = 2 * 2 * 2 * 64 * 4  # K and V x 2 layers x 2 KV heads x head_dim 64 x fp32
POOL_BLOCKS = 5  # 4 usable: vLLM keeps one null block
TTL_S = 40  # longer than any session of the script idles; its end waits it out
TOP_LOGPROBS = 400  # per chunk of D's stream: ~39 KB each, ~17 MB in all (Conversation.stream)
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--block-size", str(BLOCK),
               "--kv-cache-memory-bytes", str(POOL_BLOCKS * BLOCK * BYTES_PER_TOKEN),
               "--max-model-len", str(4 * BLOCK),
               "--kv-policy", "sirllm", "--kv-start-size", "4", "--kv-entropy-size", "32",
               "--kv-recent-size", "16", "--kv-max-sessions", "2", "--kv-session-ttl", str(TTL_S),
               "--api-server-count", "2", "--max-logprobs", str(TOP_LOGPROBS)]
WIDE = {"name": "sirllm", "start_size": 4, "entropy_size": 300, "recent_size": 0}  # room to stream


@pytest.fixture(scope="module")
def metrics_server(tiny_serving_model, tmp_path_factory):
    from sir_vllm.server.process import ServerProcess

    tmp = tmp_path_factory.mktemp("metrics-server")
    proc = ServerProcess(model=str(tiny_serving_model), served_model_name="tiny",
                         log_path=tmp / "vllm-serve.log",
                         extra_args=[*SERVER_ARGS, "--kv-session-store",
                                     f"sqlite:{tmp / 'sessions.sqlite3'}"])
    proc.start(timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))
    yield proc
    proc.stop()


class Conversation:
    """The script's client: chat turns by session id, sent to the two API
    processes in turn; the session objects they return, which process answered,
    and how long each session idled between requests (at most)."""

    def __init__(self, url):
        self.url = url
        self.clients = clients_on_each_process(url, make=bounded_reader)  # see stream()
        self.sent = 0
        self.sessions: list[tuple[str, dict, dict | None]] = []  # (id, session, the one it continued)
        self.replicas: set[str] = set()
        self.last_seen: dict[str, float] = {}  # session id -> when its last request was sent
        self.last_answered: dict[str, float] = {}  # ... and when it was answered
        self.longest_idle = 0.0
        self.streamed_bytes = 0  # what stream() read after its probe

    def body(self, sid, messages, max_tokens=6, **extra):
        return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "session_id": sid, **extra}

    def next_client(self) -> httpx.Client:
        self.sent += 1
        return self.clients[self.sent % 2]

    def _timed(self, sid, call):
        """A request on a session: the time since its previous one (an upper bound on
        how long the store saw it idle) is at most now, when this one has answered."""
        started = time.monotonic()
        r = call()
        if sid in self.last_seen:
            self.longest_idle = max(self.longest_idle, time.monotonic() - self.last_seen[sid])
        self.last_seen[sid], self.last_answered[sid] = started, time.monotonic()
        if REPLICA in r.headers:
            self.replicas.add(r.headers[REPLICA])
        return r

    def post(self, sid, messages, client=None, **kw):
        client = client or self.next_client()
        return self._timed(sid, lambda: client.post(self.url + "/v1/chat/completions",
                                                    json=self.body(sid, messages, **kw)))

    def delete(self, sid):
        client = self.next_client()
        return self._timed(sid, lambda: client.delete(f"{self.url}/v1/sessions/{sid}"))

    def turn(self, sid, messages, base=None, **kw) -> tuple[str, dict]:
        r = self.post(sid, messages, **kw)
        assert r.status_code == 200, r.text
        session = r.json()["session"]
        self.sessions.append((sid, session, base))
        return r.json()["choices"][0]["message"]["content"], session

    @staticmethod
    def _data(lines, n):
        """The next `n` data chunks of an SSE stream."""
        got = []
        for line in lines:
            if line.startswith("data:"):
                got.append(line[5:].strip())
                if len(got) == n:
                    break
        return got

    def abandon(self, sid, messages, max_tokens, after: int) -> None:
        """A streamed turn whose client hangs up after `after` chunks (its own
        connection: closing it is what tells the server)."""
        def call():
            with httpx.Client(timeout=300) as client, client.stream(
                    "POST", self.url + "/v1/chat/completions",
                    json=self.body(sid, messages, max_tokens, stream=True)) as r:
                assert r.status_code == 200
                assert len(self._data(r.iter_lines(), after)) == after
                return r

        self._timed(sid, call)

    def stream(self, sid, messages, max_tokens, while_streaming) -> dict:
        """A streamed turn read to its end on one API process, `while_streaming(the
        other process's client)` called after its first chunk; the session object
        of its last chunk. Until the client reads on, the turn cannot commit: its
        chunks (TOP_LOGPROBS log-probs each) add up to several times what the
        server's send buffer and the reader's receive buffer hold (`stall_bound`),
        so the server's sends wait (the bytes it streamed are
        in `streamed_bytes`, for the test to check that premise)."""
        client, other = self.clients
        rest: list[str] = []

        def call():
            with client.stream("POST", self.url + "/v1/chat/completions",
                               json=self.body(sid, messages, max_tokens, stream=True, logprobs=True,
                                             top_logprobs=TOP_LOGPROBS)) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                self._data(lines, 1)
                while_streaming(other)
                for line in lines:
                    self.streamed_bytes += len(line) + 1
                    if line.startswith("data:"):
                        rest.append(line[5:].strip())
                return r

        self._timed(sid, call)
        assert rest[-1] == "[DONE]"
        session = json.loads(rest[-2])["session"]
        self.sessions.append((sid, session, None))
        return session


def user(text):
    return {"role": "user", "content": text}


def test_metrics_count_a_scripted_conversation_exactly(metrics_server):
    """Every metric of issue 15 after a scripted conversation on two API
    processes: sessions live, pinned, dropped (lru) and expired; tokens kept,
    loaded, evicted and recomputed; compaction seconds; store operation seconds;
    turns by outcome (ok, 400, 409, rolled back, rebuilt, aborted)."""
    url = metrics_server.url
    c = Conversation(url)
    # A: two turns (the second evicts), a regenerate, then a different conversation
    history = [user("Hi there, my name is Ada.")]
    answer, a1 = c.turn("A", history)
    history += [{"role": "assistant", "content": answer}, user("Tell me a fact about tea.")]
    _, a2 = c.turn("A", history, base=a1)
    _, a3 = c.turn("A", history, base=a1)  # the last answer left out: regenerate
    _, a4 = c.turn("A", [user("Something else."), {"role": "assistant", "content": "ok"},
                         user("And more.")])
    assert a2["evicted_tokens"] > 0 and a2["loaded_tokens"] > 0
    assert a3["rolled_back_turns"] == 1 and a3["loaded_tokens"] > 0 and a4["rebuilt"]
    bad = c.post("X", [user("hi")], kv_policy={"name": "sirllm", "entropy_size": -3})
    assert bad.status_code == 400 and "entropy_size" in bad.text
    # B pins 1 block; C's first turn drops A from the store (--kv-max-sessions 2); C is deleted
    _, b1 = c.turn("B", [user("Hello, I am Bob.")], kv_policy=WIDE)
    c.turn("C", [user("Hi, I am Carol.")])
    assert c.delete("C").status_code == 200
    # B: a streamed turn the client leaves after two chunks (it loaded B's kept tokens)
    c.abandon("B", [user("Tell me a long story.")], 150, after=2)
    # D: a long first turn needs the whole pool (B's pins go); a second request
    # meanwhile, on the other API process, is a 409 (the lease is in the shared store)
    conflicts = []
    d1 = c.stream("D", [user("Write a very long poem.")], 440,
                  while_streaming=lambda other: conflicts.append(
                      c.post("D", [user("Another.")], client=other)))
    # what the 409 relies on: D's sends waited for its reader
    assert stalled(c.streamed_bytes), \
        f"D streamed {c.streamed_bytes} B, bound {stall_bound()} B: raise TOP_LOGPROBS"
    assert [r.status_code for r in conflicts] == [409] and d1["turns"] == 1
    # B again: D's pins go for it; B's own were dropped, so its kept tokens are recomputed
    _, b3 = c.turn("B", [user("What is my name?")], base=b1)
    assert b3["turns"] == 2 and b3["recomputed_tokens"] == b1["retained_tokens"] > 0
    assert b3["loaded_tokens"] == 0
    assert c.delete("D").status_code == 200
    assert len(c.replicas) == 2  # both API processes served the script
    assert c.longest_idle < TTL_S, f"a session idled {c.longest_idle:.0f}s: raise TTL_S"

    m = scrape(url)

    def at(name, **labels):
        return sample(m, name, **labels)

    assert {o: at("vllm:sir_turns_total", outcome=o) for o in OUTCOMES} == {
        OK: 6, ROLLED_BACK: 1, REBUILT: 1, BAD_REQUEST: 1, CONFLICT: 1, ABORTED: 1, ERROR: 0}
    committed = [s for _, s, _ in c.sessions]
    assert len(committed) == 8
    evicted = sum(s["evicted_tokens"] - (base["evicted_tokens"] if base else 0)
                  for sid, s, base in c.sessions)
    assert evicted == 2 * a2["evicted_tokens"] > 0  # A's second turn and its regenerate
    assert at("vllm:sir_tokens_evicted_total") == evicted
    for metric, key in (("kept", "retained_tokens"), ("loaded", "loaded_tokens"),
                        ("recomputed", "recomputed_tokens")):
        assert at(f"vllm:sir_tokens_{metric}_total") == sum(s[key] for s in committed), metric
    assert at("vllm:sir_tokens_recomputed_total") == b3["recomputed_tokens"] > 0
    # the store: B is left; A went for C (lru); C and D were deleted; nothing expired yet
    assert at("vllm:sir_sessions_live") == 1
    assert at("vllm:sir_sessions_dropped_total", reason="lru") == 1
    assert at("vllm:sir_sessions_dropped_total", reason="expired") == 0
    assert at("vllm:sir_sessions_deleted_total") == 2
    # the engine: B's pins dropped for D, D's for B; B's 1-block pins left
    assert at("vllm:sir_pins_dropped_total") == 2
    assert at("vllm:sir_pin_miss_tokens_total") == b3["recomputed_tokens"]
    assert at("vllm:sir_sessions_pinned") == 1 and at("vllm:sir_pinned_kv_blocks") == 1
    # compactions: every turn that loaded kept tokens (A2, A3) and the aborted one on B
    loads = sum(s["loaded_tokens"] > 0 for s in committed) + 1
    assert loads == 3 and at("vllm:sir_compaction_seconds_count") == loads
    logged = compaction_lines(metrics_server.log_path)
    assert len(logged) == loads  # the worker's line for humans: one per job, as the histogram
    assert at("vllm:sir_compaction_seconds_sum") * 1e3 == pytest.approx(sum(logged), rel=0.1,
                                                                         abs=0.05)
    assert at("vllm:sir_compaction_seconds_bucket", le="+Inf") == loads
    assert at("vllm:sir_compacted_tokens_total") >= sum(s["loaded_tokens"] for s in committed)
    from sir_vllm.bench.runner import read_compaction

    assert read_compaction(url)["count"] == loads  # what `sir-vllm bench` reads per run
    # every store operation timed: 10 turns past their checks and 2 deletes leased the
    # session (the 409's lease was refused: nothing to release); 8 commits
    store = {op: at("vllm:sir_store_operation_seconds_count", operation=op, backend="sqlite")
             for op in ("lease", "release", "put", "delete", "get", "count")}
    assert (store["lease"], store["release"], store["put"], store["delete"]) == (12, 11, 8, 2)
    assert store["get"] >= 9 and store["count"] >= 1
    assert at("vllm:sir_store_operation_seconds_sum", operation="put", backend="sqlite") > 0

    # expiry: B idles past --kv-session-ttl; the next read drops it, and with it its pins
    time.sleep(max(0.0, c.last_answered["B"] + TTL_S + 1 - time.monotonic()))
    assert c.next_client().get(url + "/v1/sessions/B").status_code == 404
    deadline = time.monotonic() + 30
    while True:  # the pins go in the background, after the store dropped the session
        m = scrape(url)
        if at("vllm:sir_sessions_pinned") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert at("vllm:sir_sessions_dropped_total", reason="expired") == 1
    assert at("vllm:sir_sessions_dropped_total", reason="lru") == 1
    assert at("vllm:sir_sessions_live") == 0
    assert at("vllm:sir_sessions_pinned") == 0 and at("vllm:sir_pinned_kv_blocks") == 0
    assert sum(at("vllm:sir_turns_total", outcome=o) for o in OUTCOMES) == 11  # a GET is no turn


def test_a_session_whose_turn_filled_the_pool_takes_its_next_turn(metrics_server):
    """A first turn of ~460 tokens pins all 4 blocks of the pool; the next turn
    needs one more, which only its own pins hold. They go (the kept tokens are
    recomputed from their ids) rather than the turn waiting for ever."""
    url = metrics_server.url

    def post(messages, max_tokens):
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "session_id": "full"})
        assert r.status_code == 200, r.text
        return r.json()

    history = [user("Write a very long poem.")]
    first = post(history, 440)
    assert first["usage"]["total_tokens"] > 3 * BLOCK
    history += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                user("Thanks.")]
    second = post(history, 6)["session"]  # a timeout here: the turn waited on its own pins
    assert second["turns"] == 2 and second["loaded_tokens"] == 0, second
    assert 0 < second["recomputed_tokens"] <= second["budget"], second  # all it kept
    assert httpx.delete(f"{url}/v1/sessions/full", timeout=60).status_code == 200
