"""Where session states live, by (tenant, session id), within limits an operator sets.

A tenant is a hash of the request's API key, so one key can neither continue
nor read another key's session. The store is bounded: at most `max_sessions`
states (the least recently used idle one goes first when a new session would
pass the cap) and none idle for longer than `ttl` seconds. Each drop is
logged and counted, and reported to `on_drop` so the engine can free the
session's pinned KV. A dropped session's next request starts a new session
(a whole-history chat request rebuilds it): never another session's memory.

One request per session at a time: `lease` hands out a lease that expires by
itself (`lease_seconds`), so a holder that crashed cannot block its session.

`SessionStore` is the interface; `make_store` picks a backend from a
`--kv-session-store` value:

    memory              this process only (`MemoryStore`, here)
    sqlite[:PATH]       one file, shared by the API processes of one host
                        (`sqlite_store.SqliteStore`; PATH defaults to
                        `default_sqlite_path()`)
    redis://HOST:PORT/DB  shared by processes and hosts (`redis_store.RedisStore`)

Every backend writes a turn's state whole or not at all. `fault_point` is the
test hook that kills the process where a crash would hurt most (after the
engine answered, before and in the middle of the write).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sir_vllm.sessions.state import SessionState

logger = logging.getLogger("vllm.sir_vllm.sessions")

DEFAULT_TTL = 86400.0
DEFAULT_LEASE_SECONDS = 600.0


def tenant_of(api_key: str | None, namespace: str = "") -> str:
    """The tenant of a request: a hash of its API key within the store's
    namespace (the served model), never the key itself."""
    return hashlib.sha256(f"{namespace}\x00{api_key or ''}".encode()).hexdigest()[:16]


FAULT_ENV = "SIR_VLLM_FAULT"  # POINT or POINT:N (die the N-th time POINT is reached)
FAULT_EXIT_CODE = 86
FAULT_POINTS = ("store-put-before", "store-put-mid")
_fault_hits: dict[str, int] = {}


def fault_due(point: str) -> bool:
    """Whether the process must die at this pass through `point` (SIR_VLLM_FAULT
    names it, and this is its N-th pass). Counts the pass."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return False
    name, _, nth = want.partition(":")
    if name != point:
        return False
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    return _fault_hits[point] >= int(nth or 1)


def crash() -> None:
    """End the process as a crash would: no cleanup, no flush, no commit."""
    os._exit(FAULT_EXIT_CODE)


def fault_point(point: str) -> None:
    """Test hook: die here when SIR_VLLM_FAULT names this point. Stores pass
    `store-put-before` at the start of `put` (the engine answered, nothing
    written yet) and `store-put-mid` in the middle of the write."""
    if fault_due(point):
        crash()


def state_bytes(state: SessionState) -> bytes:
    """The stored form of a state (JSON of `SessionState.to_dict`), for stores
    outside this process."""
    return json.dumps(state.to_dict(), separators=(",", ":")).encode()


def state_from_bytes(data: bytes | str) -> SessionState:
    return SessionState.from_dict(json.loads(data))


def default_sqlite_path() -> Path:
    """`sqlite` without a path: a file under the cache folder (SIR_VLLM_CACHE overrides)."""
    from sir_vllm.models.bundled import cache_root

    return cache_root() / "sessions.sqlite3"


@dataclass(frozen=True)
class Lease:
    tenant: str
    session_id: str
    token: str
    expires: float


@dataclass
class StoreCounters:
    dropped_lru: int = 0  # states dropped to stay under max_sessions
    expired: int = 0  # states dropped for being idle longer than the TTL
    deleted: int = 0  # DELETE /v1/sessions/{id}


@dataclass
class StoreLimits:
    max_sessions: int | None = None  # None: unbounded
    ttl: float = DEFAULT_TTL  # seconds idle before expiry; 0: never
    lease_seconds: float = DEFAULT_LEASE_SECONDS


class SessionStore:
    """The interface every backend implements (all methods are coroutines)."""

    name = "abstract"

    def __init__(self, limits: StoreLimits | None = None,
                 on_drop: Callable[[SessionState, str], None] | None = None):
        self.limits = limits or StoreLimits()
        self.on_drop = on_drop
        self.counters = StoreCounters()

    async def get(self, tenant: str, session_id: str) -> SessionState | None:
        raise NotImplementedError

    async def put(self, state: SessionState) -> None:
        """Write the state atomically (all of it or, on failure, none of it)."""
        raise NotImplementedError

    async def delete(self, tenant: str, session_id: str) -> SessionState | None:
        raise NotImplementedError

    async def lease(self, tenant: str, session_id: str) -> Lease | None:
        """A lease on the session, or None while another request holds one."""
        raise NotImplementedError

    async def release(self, lease: Lease) -> None:
        raise NotImplementedError

    async def list(self, tenant: str) -> list[SessionState]:
        raise NotImplementedError

    async def count(self) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def _dropped(self, state: SessionState, reason: str) -> None:
        if reason == "lru":
            self.counters.dropped_lru += 1
        elif reason == "expired":
            self.counters.expired += 1
        logger.warning("sir-vllm: session %r dropped from the %s store (%s; idle %.0fs, %d turns); "
                       "its next request starts a new session", state.id, self.name,
                       "least recently used, over --kv-max-sessions" if reason == "lru"
                       else "idle longer than --kv-session-ttl", time.time() - state.last_used,
                       state.turns)
        if self.on_drop is not None:
            self.on_drop(state, reason)


class MemoryStore(SessionStore):
    """Sessions in this process's memory, least recently used first out."""

    name = "memory"

    def __init__(self, limits: StoreLimits | None = None,
                 on_drop: Callable[[SessionState, str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        super().__init__(limits, on_drop)
        self.clock = clock
        self._states: OrderedDict[tuple[str, str], SessionState] = OrderedDict()
        self._leases: dict[tuple[str, str], Lease] = {}

    def _held(self, key) -> bool:
        lease = self._leases.get(key)
        return lease is not None and lease.expires > self.clock()

    def _expire(self) -> None:
        ttl = self.limits.ttl
        if not ttl:
            return
        cutoff = self.clock() - ttl
        for key, state in list(self._states.items()):  # LRU order: oldest first
            if state.last_used >= cutoff:
                break
            if not self._held(key):
                del self._states[key]
                self._dropped(state, "expired")

    def _make_room(self) -> None:
        cap = self.limits.max_sessions
        if cap is None:
            return
        for key in list(self._states):
            if len(self._states) < cap:
                break
            if not self._held(key):
                self._dropped(self._states.pop(key), "lru")

    async def get(self, tenant, session_id):
        self._expire()
        return self._states.get((tenant, session_id))

    async def put(self, state):
        key = (state.tenant, state.id)
        if key not in self._states:
            self._expire()
            self._make_room()
        self._states[key] = state
        self._states.move_to_end(key)

    async def delete(self, tenant, session_id):
        state = self._states.pop((tenant, session_id), None)
        if state is not None:
            self.counters.deleted += 1
        return state

    async def lease(self, tenant, session_id):
        key = (tenant, session_id)
        if self._held(key):
            return None
        now = self.clock()
        lease = Lease(tenant, session_id, uuid.uuid4().hex, now + self.limits.lease_seconds)
        self._leases[key] = lease
        return lease

    async def release(self, lease):
        key = (lease.tenant, lease.session_id)
        if self._leases.get(key) == lease:
            del self._leases[key]

    async def list(self, tenant):
        self._expire()
        return [s for (t, _), s in self._states.items() if t == tenant]

    async def count(self):
        return len(self._states)


STORE_FORMS = "memory, sqlite, sqlite:PATH, redis://HOST:PORT/DB"


def store_kind(spec: str | None) -> str:
    """`memory`, `sqlite` or `redis` for a `--kv-session-store` value (None: the
    default, sqlite); ValueError for anything else. Connects to nothing."""
    spec = (spec or DEFAULT_STORE).strip()
    kind = spec.partition(":")[0]
    if spec == "memory":
        return "memory"
    if kind == "sqlite":
        return "sqlite"
    if kind in ("redis", "rediss") and spec.partition("://")[2]:
        return "redis"
    raise ValueError(f"unknown session store {spec!r}; one of: {STORE_FORMS}")


DEFAULT_STORE = "sqlite"


def make_store(spec: str | None, limits: StoreLimits | None = None,
               on_drop: Callable[[SessionState, str], None] | None = None) -> SessionStore:
    """The store a `--kv-session-store` value names (None: `memory`)."""
    spec = (spec or "memory").strip()
    kind, _, rest = spec.partition(":")
    if spec == "memory":
        return MemoryStore(limits, on_drop)
    if kind == "sqlite":
        from sir_vllm.sessions.sqlite_store import SqliteStore

        path = Path(rest).expanduser() if rest else default_sqlite_path()
        return SqliteStore(path, limits, on_drop)
    if kind in ("redis", "rediss"):
        from sir_vllm.sessions.redis_store import RedisStore

        return RedisStore(spec, limits, on_drop)
    raise ValueError(f"unknown session store {spec!r}; one of: {STORE_FORMS}")
