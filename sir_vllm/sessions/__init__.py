"""Sessions: per-session state between requests, and the service that runs a turn.

    state.py    SessionState / Snapshot: what a session keeps (bounded by its budget)
    history.py  how a chat request's messages relate to the session (continue, roll back, rebuild)
    turn.py     plan a turn's prompt and eviction; commit its result as a new snapshot
    engine.py   the engine as the service sees it, and the reader of its output
    store.py    where states live (by tenant and id), with a session cap, a TTL and leases;
                the memory backend, and make_store for a --kv-session-store value
    sqlite_store.py, redis_store.py   the durable and the shared backends
    service.py  one turn from request to committed state (the engine injected)

Nothing here imports vLLM or knows HTTP: the server's middleware adapts.
"""

from sir_vllm.sessions.history import ChatError, normalize_messages, resolve
from sir_vllm.sessions.service import (SessionError, SessionService, ServiceConfig, Turn,
                                       TurnRequest)
from sir_vllm.sessions.state import SessionState, Snapshot
from sir_vllm.sessions.store import MemoryStore, SessionStore, StoreLimits, make_store, tenant_of
from sir_vllm.sessions.turn import TurnError, TurnPlan, commit_turn, plan_turn

__all__ = ["ChatError", "MemoryStore", "ServiceConfig", "SessionError", "SessionService",
           "SessionState", "SessionStore", "Snapshot", "StoreLimits", "Turn", "TurnError",
           "TurnPlan", "TurnRequest", "commit_turn", "make_store", "normalize_messages",
           "plan_turn", "resolve", "tenant_of"]
