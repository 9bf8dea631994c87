"""Which replica holds which session: the request router's memory, in plain Python.

A session's KV pins live in one replica's engine, so the router remembers, per
session id, the replica its last request went to. The table is bounded like
the session store it mirrors: a session idle for `ttl_s` seconds is
forgotten (the store forgets it too; 0: never), and past `max_sessions` the
least recently used goes first. Forgetting a session here costs at most one
recompute of its kept tokens on the replica it lands on next, never its
state, which is in the shared store.

Owners are opaque hashables (Ray's `ReplicaID` in the router, strings in tests).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable, Iterable

DEFAULT_TTL_S = 86400.0  # the session store's default (--kv-session-ttl)
DEFAULT_MAX_SESSIONS = 100_000


class SessionTable:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0 (0: never expire), got {ttl_s}")
        self.ttl_s = float(ttl_s)
        self.max_sessions = int(max_sessions)
        self._clock = clock
        self._owner_of: OrderedDict[str, tuple[Hashable, float]] = OrderedDict()  # LRU order
        self._sessions_of: dict[Hashable, set[str]] = {}

    def __len__(self) -> int:
        return len(self._owner_of)

    def owner(self, session_id: str) -> Hashable | None:
        """The replica holding the session, or None (never seen, or forgotten)."""
        self._expire()
        entry = self._owner_of.get(session_id)
        return None if entry is None else entry[0]

    def assign(self, session_id: str, owner: Hashable) -> None:
        """Record that the session's latest request went to `owner` (also a touch)."""
        old = self._owner_of.pop(session_id, None)
        if old is not None and old[0] != owner:
            self._discard(session_id, old[0])
        self._owner_of[session_id] = (owner, self._clock())
        self._sessions_of.setdefault(owner, set()).add(session_id)
        self._expire()

    def count(self, owner: Hashable) -> int:
        """Sessions the replica holds (within the TTL)."""
        self._expire()
        return len(self._sessions_of.get(owner, ()))

    def counts(self) -> dict[Hashable, int]:
        self._expire()
        return {owner: len(ids) for owner, ids in self._sessions_of.items() if ids}

    def forget_owner(self, owner: Hashable) -> int:
        """Forget every session of a replica that is gone; returns how many. Their
        next requests are placed as new sessions and continue from the store."""
        ids = self._sessions_of.pop(owner, set())
        for sid in ids:
            self._owner_of.pop(sid, None)
        return len(ids)

    def by_fewest_sessions(self, owners: Iterable[Hashable],
                           load: Callable[[Hashable], float] = lambda _: 0) -> list[Hashable]:
        """`owners` in the order a new session should try them: fewest sessions
        first, then the least loaded, then by name (so the order is stable)."""
        self._expire()
        return sorted(owners, key=lambda o: (len(self._sessions_of.get(o, ())), load(o), str(o)))

    def _discard(self, session_id: str, owner: Hashable) -> None:
        ids = self._sessions_of.get(owner)
        if ids is not None:
            ids.discard(session_id)
            if not ids:
                del self._sessions_of[owner]

    def _expire(self) -> None:
        horizon = self._clock() - self.ttl_s if self.ttl_s else None
        while self._owner_of:
            sid, (owner, seen) = next(iter(self._owner_of.items()))
            if len(self._owner_of) <= self.max_sessions and (horizon is None or seen >= horizon):
                return
            del self._owner_of[sid]
            self._discard(sid, owner)
