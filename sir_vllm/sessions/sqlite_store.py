"""The `sqlite:PATH` session store: one file, shared by the API processes of one host.

Schema (PRAGMA user_version 1):

    sessions(tenant, id, last_used, state)  PRIMARY KEY (tenant, id); index on last_used
    leases(tenant, id, token, expires)      PRIMARY KEY (tenant, id)

`state` is the JSON of `SessionState.to_dict()`; `last_used` is the time of
its last put (a turn), so the TTL and the cap's LRU order count from the last
turn, as in `MemoryStore`. Every read and write names (tenant, id): no
statement reads a row without its tenant, and `list` selects one tenant's rows.

* **Atomic put**: the state row, and the rows that make room for it, are
  written in one `BEGIN IMMEDIATE` transaction; a process that dies before
  `COMMIT` leaves the previous turn's row (SQLite's journal rolls the rest back);
  a request cancelled while its put runs does not stop the worker thread, so
  the transaction still commits or rolls back whole.
* **TTL and cap**, on put and get as `MemoryStore` does: rows idle longer than
  the TTL are deleted (the `last_used` index finds them), and a new session
  over `max_sessions` deletes the least recently used ones. A session whose
  lease is alive is never dropped. Every dropped row is decoded and reported
  to `_dropped` (after its transaction committed, in the caller's event loop,
  so `on_drop` may schedule work there). A row dropped by another process is
  reported by that process, to its own `on_drop`.
* **Leases**: a row in `leases`, taken in a `BEGIN IMMEDIATE` transaction only
  when no live one exists (`expires` past: a crashed holder's lease is taken
  over), released only with the holder's token. Expiry compares wall clocks,
  which is sound on one host.

Concurrency: WAL mode, so readers never wait for the writer and several
processes share the file (one host: WAL needs shared memory, not a network
filesystem); `busy_timeout` makes a writer wait for another process's
transaction instead of failing. Every operation runs in this store's own
worker thread, on that thread's one connection, so the event loop never
waits on the disk or on another process's lock; operations are small
(one row of a few KB to ~100 KB, a few indexed statements), so one thread
keeps up. `synchronous=NORMAL`: a committed turn survives the process dying;
only a power cut may lose the last few (the state is a cache of the
conversation: the client's whole history rebuilds it).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from sir_vllm.sessions.state import SessionState
from sir_vllm.sessions.store import (Lease, SessionStore, StoreLimits, fault_point, state_bytes,
                                     state_from_bytes)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
# What a lock held by another connection raises (Python's `sqlite_errorname`).
BUSY_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_RECOVERY", "SQLITE_BUSY_SNAPSHOT")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    last_used REAL NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS sessions_last_used ON sessions (last_used);
CREATE TABLE IF NOT EXISTS leases (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    token TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (tenant, id)
);
"""

# A session is held while its lease is alive; held sessions are never dropped.
_NOT_HELD = ("NOT EXISTS (SELECT 1 FROM leases l WHERE l.tenant = s.tenant AND l.id = s.id "
             "AND l.expires > :now)")
_EXPIRED = f"SELECT s.tenant, s.id, s.state FROM sessions s WHERE s.last_used < :cutoff AND {_NOT_HELD}"
_OLDEST = f"SELECT s.tenant, s.id, s.state FROM sessions s WHERE {_NOT_HELD} ORDER BY s.last_used LIMIT :n"

Dropped = list[tuple[SessionState, str]]


class SqliteStore(SessionStore):
    name = "sqlite"

    def __init__(self, path: str | Path, limits: StoreLimits | None = None,
                 on_drop: Callable[[SessionState, str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        super().__init__(limits, on_drop)
        self.path = Path(path)
        self.clock = clock
        self._conn: sqlite3.Connection | None = None  # used by the worker thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sir-sqlite-store")
        self._closed = False

    # -- the worker thread -------------------------------------------------
    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        """A set-up connection, retried while another process holds the file's lock.

        Two processes opening a fresh file at once both switch it to WAL, and
        SQLite answers the loser "database is locked" without calling the busy
        handler (CI saw it; here 14-29 of 200 such openings); so the set-up
        waits, as `busy_timeout` would, up to BUSY_TIMEOUT_S."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.005
        while True:
            # isolation_level=None: no implicit transactions, each one is explicit below.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                self._set_up(conn)
                return conn
            except sqlite3.OperationalError as e:
                conn.close()
                if e.sqlite_errorname not in BUSY_ERRORS or time.monotonic() >= deadline:
                    raise
            except BaseException:
                conn.close()
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _set_up(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # kept in the file: set once
        conn.execute("PRAGMA synchronous = NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: session store schema {version}, this sir-vllm "
                               f"reads {SCHEMA_VERSION}; point --kv-session-store elsewhere")
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _write(self, body: Callable[[sqlite3.Connection], object]):
        """`body` inside one BEGIN IMMEDIATE transaction: committed whole or rolled back."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _expire_in(self, db: sqlite3.Connection, now: float) -> Dropped:
        ttl = self.limits.ttl
        if not ttl:
            return []
        rows = db.execute(_EXPIRED, {"cutoff": now - ttl, "now": now}).fetchall()
        db.executemany("DELETE FROM sessions WHERE tenant = ? AND id = ?", [r[:2] for r in rows])
        if rows:
            db.execute("DELETE FROM leases WHERE expires <= ?", (now,))  # crashed holders'
        return [(state_from_bytes(r[2]), "expired") for r in rows]

    def _make_room_in(self, db: sqlite3.Connection, now: float) -> Dropped:
        cap = self.limits.max_sessions
        if cap is None:
            return []
        over = db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] - cap + 1
        if over <= 0:
            return []
        rows = db.execute(_OLDEST, {"now": now, "n": over}).fetchall()
        db.executemany("DELETE FROM sessions WHERE tenant = ? AND id = ?", [r[:2] for r in rows])
        return [(state_from_bytes(r[2]), "lru") for r in rows]

    def _sweep(self) -> Dropped:
        """Drop the expired sessions; a read-only probe first, so a get with
        nothing to expire never takes the write lock."""
        now = self.clock()
        if not self.limits.ttl or self._db().execute(
                _EXPIRED + " LIMIT 1", {"cutoff": now - self.limits.ttl, "now": now}).fetchone() is None:
            return []
        return self._write(lambda db: self._expire_in(db, now))

    def _get(self, tenant: str, session_id: str) -> tuple[SessionState | None, Dropped]:
        dropped = self._sweep()
        row = self._db().execute("SELECT state FROM sessions WHERE tenant = ? AND id = ?",
                                 (tenant, session_id)).fetchone()
        return (None if row is None else state_from_bytes(row[0])), dropped

    def _put(self, state: SessionState) -> Dropped:
        blob = state_bytes(state)

        def body(db: sqlite3.Connection) -> Dropped:
            now = self.clock()
            dropped: Dropped = []
            known = db.execute("SELECT 1 FROM sessions WHERE tenant = ? AND id = ?",
                               (state.tenant, state.id)).fetchone()
            if known is None:
                dropped = self._expire_in(db, now) + self._make_room_in(db, now)
            db.execute("INSERT INTO sessions (tenant, id, last_used, state) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (tenant, id) DO UPDATE SET last_used = excluded.last_used, "
                       "state = excluded.state", (state.tenant, state.id, now, blob))
            fault_point("store-put-mid")  # written, not committed
            return dropped

        return self._write(body)

    def _delete(self, tenant: str, session_id: str) -> SessionState | None:
        def body(db: sqlite3.Connection):
            row = db.execute("SELECT state FROM sessions WHERE tenant = ? AND id = ?",
                             (tenant, session_id)).fetchone()
            db.execute("DELETE FROM sessions WHERE tenant = ? AND id = ?", (tenant, session_id))
            return row

        row = self._write(body)
        return None if row is None else state_from_bytes(row[0])

    def _lease(self, tenant: str, session_id: str) -> Lease | None:
        def body(db: sqlite3.Connection) -> Lease | None:
            now = self.clock()
            lease = Lease(tenant, session_id, uuid.uuid4().hex, now + self.limits.lease_seconds)
            taken = db.execute(
                "INSERT INTO leases (tenant, id, token, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant, id) DO UPDATE SET token = excluded.token, "
                "expires = excluded.expires WHERE leases.expires <= ?",
                (tenant, session_id, lease.token, lease.expires, now)).rowcount
            return lease if taken == 1 else None

        return self._write(body)

    def _release(self, lease: Lease) -> None:
        self._db().execute("DELETE FROM leases WHERE tenant = ? AND id = ? AND token = ?",
                           (lease.tenant, lease.session_id, lease.token))

    def _list(self, tenant: str) -> tuple[list[SessionState], Dropped]:
        dropped = self._sweep()
        rows = self._db().execute("SELECT state FROM sessions WHERE tenant = ? ORDER BY last_used",
                                  (tenant,)).fetchall()
        return [state_from_bytes(r[0]) for r in rows], dropped

    def _count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the interface -------------------------------------------------------
    def _report(self, dropped: Dropped) -> None:
        for state, reason in dropped:
            self._dropped(state, reason)

    async def get(self, tenant, session_id):
        state, dropped = await self._call(self._get, tenant, session_id)
        self._report(dropped)
        return state

    async def put(self, state):
        fault_point("store-put-before")  # the engine answered; nothing written yet
        self._report(await self._call(self._put, state))

    async def delete(self, tenant, session_id):
        state = await self._call(self._delete, tenant, session_id)
        if state is not None:
            self.counters.deleted += 1
        return state

    async def lease(self, tenant, session_id):
        return await self._call(self._lease, tenant, session_id)

    async def release(self, lease):
        await self._call(self._release, lease)

    async def list(self, tenant):
        states, dropped = await self._call(self._list, tenant)
        self._report(dropped)
        return states

    async def count(self):
        return await self._call(self._count)

    async def close(self):
        if self._closed:
            return
        self._closed = True
        await self._call(self._close)
        self._worker.shutdown(wait=True)
