"""The session layer's Prometheus metrics, on vLLM's own `/metrics`.

`vllm serve` exposes one registry at `/metrics`: prometheus_client's default
`REGISTRY` with one API process, a `MultiProcessCollector` over
`PROMETHEUS_MULTIPROC_DIR` (which `vllm serve` sets up) with
`--api-server-count N`. Metrics made here with prometheus_client's own
classes land in both, named and labelled as vLLM names its own
(`vllm:...`, `model_name`); counters and histograms add up over API
processes, and the gauges are the values every process reads from what they
share (`multiprocess_mode="mostrecent"`, as vLLM's gauges).

They are made once per process, after vLLM's Prometheus logger has started
(it unregisters every `vllm:` collector it finds when it starts), by the
session middleware when it builds its service:

* turns by outcome, and the tokens of every committed turn (`TurnMeter`,
  around the middleware's turn);
* the store's sessions dropped, expired and deleted, and the time of every
  store operation (`MeteredStore`, around whichever backend `make_store` made);
* what is true now, read when `/metrics` is scraped (`refresh`): the store's
  live sessions, and the engine's pinned sessions and blocks (`EngineQuery.STATS`).

What happens inside the engine (compaction time, pins dropped for pool
pressure) comes through vLLM's KV-connector stats instead: `connector.metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from sir_vllm.connector.protocol import EngineQuery, PoolStats
from sir_vllm.sessions.engine import EngineError, EngineStreamError
from sir_vllm.sessions.store import SessionStore

logger = logging.getLogger("vllm.sir_vllm.sessions")

METRICS_PATH = "/metrics"  # vLLM's route (it also answers /metrics/...)
REFRESH_TIMEOUT_S = 2.0  # a scrape never waits longer on the store or the engine

OK, ROLLED_BACK, REBUILT = "ok", "rolled_back", "rebuilt"
BAD_REQUEST, CONFLICT, ABORTED, ERROR = "bad_request", "conflict", "aborted", "error"
OUTCOMES = (OK, ROLLED_BACK, REBUILT, BAD_REQUEST, CONFLICT, ABORTED, ERROR)
DROP_REASONS = ("lru", "expired")  # SessionStore._dropped's reasons
STORE_OPERATIONS = ("get", "put", "delete", "lease", "release", "list", "count")

# One store operation: microseconds in memory, a few ms for SQLite or Redis,
# more when another process holds SQLite's write lock.
STORE_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 10.0)


def turn_outcome(error: BaseException | None, session: dict | None) -> str:
    """How one session turn ended, from what it raised and the `session`
    object it committed (None: nothing committed).

    A committed turn is ok, rolled_back or rebuilt (a chat request resolved
    against an earlier turn, or a conversation rebuilt), even if sending its
    answer failed afterwards: the session moved on, its tokens are counted; a
    refusal is bad_request (400: ours or vLLM's) or conflict (409: a request
    in progress); a turn that ran and committed nothing is aborted (the client
    left mid-stream, or the engine failed mid-turn); anything else is an error."""
    if session is not None:
        if session.get("rebuilt"):
            return REBUILT
        if session.get("rolled_back_turns"):
            return ROLLED_BACK
        return OK
    if error is None:
        return ABORTED
    status = getattr(error, "status", None)
    if status == 400:
        return BAD_REQUEST
    if status == 409:
        return CONFLICT
    if isinstance(error, (EngineError, EngineStreamError, asyncio.CancelledError)):
        return ABORTED
    return ERROR


def turn_evicted(turn) -> int:
    """Tokens one committed turn evicted (all its passes): the session's
    evicted total after it less that of the state it started from."""
    return int(turn.session["evicted_tokens"]) - int(turn.passes[0].plan.base.evicted_total)


class SessionMetrics:
    """The session layer's metrics for one served model (`model_name` label)."""

    def __init__(self, model_name: str, registry=REGISTRY):
        labels = ["model_name"]

        def make(cls, name, documentation, labelnames=(), **kw):
            return cls(name=name, documentation=documentation, labelnames=[*labels, *labelnames],
                       registry=registry, **kw)

        self.model_name = model_name
        self.sessions_live = make(
            Gauge, "vllm:sir_sessions_live", "Sessions the session store holds (read at scrape time).",
            multiprocess_mode="mostrecent").labels(model_name)
        self.sessions_pinned = make(
            Gauge, "vllm:sir_sessions_pinned",
            "Sessions whose last turn's KV the engine pins (read at scrape time).",
            multiprocess_mode="mostrecent").labels(model_name)
        self.pinned_blocks = make(
            Gauge, "vllm:sir_pinned_kv_blocks",
            "KV cache blocks the engine's session pins hold (read at scrape time).",
            multiprocess_mode="mostrecent").labels(model_name)
        dropped = make(Counter, "vllm:sir_sessions_dropped",
                       "Sessions the store dropped: lru (over --kv-max-sessions, least recently "
                       "used first) or expired (idle longer than --kv-session-ttl).", ["reason"])
        self.sessions_dropped = {r: dropped.labels(model_name, r) for r in DROP_REASONS}
        self.sessions_deleted = make(Counter, "vllm:sir_sessions_deleted",
                                     "Sessions deleted with DELETE /v1/sessions/{id}.").labels(model_name)
        turns = make(Counter, "vllm:sir_turns", "Session turns by how they ended.", ["outcome"])
        self.turns = {o: turns.labels(model_name, o) for o in OUTCOMES}
        self.tokens_kept = make(
            Counter, "vllm:sir_tokens_kept",
            "Tokens whose KV committed turns left their sessions holding (retained_tokens, summed "
            "over turns).").labels(model_name)
        self.tokens_loaded = make(
            Counter, "vllm:sir_tokens_loaded",
            "Kept tokens committed turns took from pinned KV instead of recomputing "
            "(loaded_tokens).").labels(model_name)
        self.tokens_recomputed = make(
            Counter, "vllm:sir_tokens_recomputed",
            "Kept tokens committed turns recomputed because their pinned KV was gone "
            "(recomputed_tokens).").labels(model_name)
        self.tokens_evicted = make(
            Counter, "vllm:sir_tokens_evicted",
            "Tokens committed turns evicted from their sessions.").labels(model_name)
        self.store_seconds = make(
            Histogram, "vllm:sir_store_operation_seconds",
            "Time of one session store operation.", ["operation", "backend"],
            buckets=list(STORE_BUCKETS))

    # -- turns -------------------------------------------------------------
    def meter(self) -> TurnMeter:
        return TurnMeter(self)

    def count_turn(self, outcome: str, turn=None) -> None:
        """One turn by its outcome; a committed turn's tokens (a peek commits nothing)."""
        self.turns[outcome].inc()
        session = getattr(turn, "session", None)
        if session is None or session.get("peek"):
            return
        self.tokens_kept.inc(session["retained_tokens"])
        self.tokens_loaded.inc(session["loaded_tokens"])
        self.tokens_recomputed.inc(session["recomputed_tokens"])
        self.tokens_evicted.inc(turn_evicted(turn))

    # -- the store -----------------------------------------------------------
    def metered(self, store: SessionStore) -> MeteredStore:
        return MeteredStore(store, self)

    def store_dropped(self, reason: str) -> None:
        if reason in self.sessions_dropped:
            self.sessions_dropped[reason].inc()

    # -- what is true now ----------------------------------------------------
    async def refresh(self, store: SessionStore, engine) -> None:
        """Set the gauges from the store and the engine (before `/metrics` answers);
        a part that does not answer in time keeps its last value."""
        try:
            self.sessions_live.set(await asyncio.wait_for(store.count(), REFRESH_TIMEOUT_S))
        except Exception as e:  # a scrape reports what it can
            logger.debug("sir-vllm: /metrics: no session count from the store: %s", e)
        try:
            raw = await asyncio.wait_for(engine.query(EngineQuery.STATS), REFRESH_TIMEOUT_S)
            stats = PoolStats.from_dict(raw)
            self.sessions_pinned.set(stats.pinned_sessions)
            self.pinned_blocks.set(stats.pinned_blocks)
        except Exception as e:
            logger.debug("sir-vllm: /metrics: no pool statistics from the engine: %s", e)


class TurnMeter:
    """Counts one session turn by how it ended: `with metrics.meter() as m:`
    around the request's handling, `m.turn = turn` once the turn is prepared."""

    def __init__(self, metrics: SessionMetrics):
        self.metrics = metrics
        self.turn = None

    def __enter__(self) -> TurnMeter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        session = getattr(self.turn, "session", None)
        self.metrics.count_turn(turn_outcome(exc, session), self.turn)
        return False


class MeteredStore(SessionStore):
    """A session store that times every operation and counts what it drops and
    deletes, around any backend (its behaviour and its counters unchanged)."""

    def __init__(self, inner: SessionStore, metrics: SessionMetrics):
        # no SessionStore.__init__: limits, counters and on_drop stay the backend's
        self.inner, self.metrics = inner, metrics
        self._on_drop = inner.on_drop
        inner.on_drop = self._dropped_by_inner
        self._seconds = {op: metrics.store_seconds.labels(metrics.model_name, op, inner.name)
                         for op in STORE_OPERATIONS}

    # what the backend owns, seen through the wrapper
    name = property(lambda self: self.inner.name)
    limits = property(lambda self: self.inner.limits)
    counters = property(lambda self: self.inner.counters)

    @property
    def on_drop(self):
        return self._on_drop

    @on_drop.setter
    def on_drop(self, callback) -> None:
        self._on_drop = callback

    def _dropped_by_inner(self, state, reason: str) -> None:
        self.metrics.store_dropped(reason)
        if self._on_drop is not None:
            self._on_drop(state, reason)

    async def _timed(self, operation: str, call):
        t0 = time.perf_counter()
        try:
            return await call
        finally:
            self._seconds[operation].observe(time.perf_counter() - t0)

    async def get(self, tenant, session_id):
        return await self._timed("get", self.inner.get(tenant, session_id))

    async def put(self, state):
        return await self._timed("put", self.inner.put(state))

    async def delete(self, tenant, session_id):
        state = await self._timed("delete", self.inner.delete(tenant, session_id))
        if state is not None:
            self.metrics.sessions_deleted.inc()
        return state

    async def lease(self, tenant, session_id):
        return await self._timed("lease", self.inner.lease(tenant, session_id))

    async def release(self, lease):
        return await self._timed("release", self.inner.release(lease))

    async def list(self, tenant):
        return await self._timed("list", self.inner.list(tenant))

    async def count(self):
        return await self._timed("count", self.inner.count())

    async def close(self):
        return await self.inner.close()


_current: SessionMetrics | None = None


def session_metrics(model_name: str) -> SessionMetrics:
    """This process's session metrics (made at the first call: a name is
    registered once per process)."""
    global _current
    if _current is None:
        _current = SessionMetrics(model_name)
    return _current
