"""The `redis://HOST:PORT/DB` session store: shared by API processes and hosts.

Key layout (PREFIX is `sir`; a tenant never contains `:`, so no two
(tenant, id) pairs share a key):

    PREFIX:state:TENANT:ID   string, the JSON of `SessionState.to_dict()`; PEXPIRE ttl
    PREFIX:lease:TENANT:ID   string, the holder's token; PX lease_seconds
    PREFIX:ids:TENANT        sorted set of the tenant's ids, score = last put (µs); `list`
    PREFIX:lru               sorted set of every TENANT:ID, score = last put (µs); the cap

Every key a request touches is built from its (tenant, id): nothing is read
without the tenant, and `list` reads one tenant's set. Scores and expiries
use Redis's clock (`TIME`), one clock for every host.

* **Atomic put**: one Lua script (Redis runs it whole, nothing interleaved)
  makes room under the cap, writes the state with one `SET ... PX` and
  updates both sorted sets. A process that dies before the script's command
  reached Redis in full changes nothing: Redis never runs half a command.
* **Cap**: a put of a new session over `max_sessions` deletes the least
  recently used sessions (lowest `lru` score) whose lease is not alive, in
  the same script, which returns their states: they are reported to
  `_dropped(state, "lru")`.
* **TTL**: `PX ttl` on every state key, renewed by each put. Redis expires
  keys itself, so **an expired session is not reported** to `_dropped` (its
  state is gone before any process could see it; its pinned KV goes when the
  engine's pool needs the room), `counters.expired` stays 0, and a session's
  lease does not keep it alive. The sorted sets keep the expired ids until a
  put, `list` or `count` finds their keys gone and removes them.
* **Leases**: `SET PREFIX:lease:... token NX PX lease_ms`, released by a
  compare-and-delete script (only the holder's token deletes it); a crashed
  holder's lease expires in Redis after `lease_seconds`.

Needs Redis 5 or later, standalone or primary/replica (not Redis Cluster:
the scripts touch keys of several sessions). All processes sharing a store
should run with the same limits.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

import redis.asyncio as aioredis

from sir_vllm.sessions.state import SessionState
from sir_vllm.sessions.store import (Lease, SessionStore, StoreLimits, crash, fault_due,
                                     fault_point, state_bytes, state_from_bytes)

PREFIX = "sir"
SOCKET_TIMEOUT_S = 10.0

# Shared by the scripts: Redis's clock in µs (the sorted sets' scores), and the removal of sorted-set
# entries whose state key Redis has expired (idle longer than the ttl).
_LUA_COMMON = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function forget(prefix, lru, member)
  local sep = string.find(member, ':', 1, true)
  redis.call('ZREM', lru, member)
  redis.call('ZREM', prefix .. ':ids:' .. string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
end
local function prune(prefix, lru, ttl_ms, now)
  if ttl_ms <= 0 then return end
  -- scores are whole µs: older than the cutoff is <= cutoff - 1 (a number, passed as
  -- one: Lua's own number-to-text keeps 14 digits, Redis's keeps them all)
  local old = redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl_ms * 1000 - 1, 'LIMIT', 0, 1000)
  for _, m in ipairs(old) do
    if redis.call('EXISTS', prefix .. ':state:' .. m) == 0 then forget(prefix, lru, m) end
  end
end
"""

# KEYS: state, lru, ids. ARGV: blob, ttl_ms (0: none), cap (0: none), member, id, prefix.
# Returns the states dropped to make room.
PUT_LUA = _LUA_COMMON + """
local ttl, cap, member, prefix = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[6]
local now = now_us()
local dropped = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
  prune(prefix, KEYS[2], ttl, now)
  if cap > 0 then
    local n = redis.call('ZCARD', KEYS[2])
    local skipped = 0
    while n >= cap do
      local batch = redis.call('ZRANGE', KEYS[2], skipped, skipped + 63)
      if #batch == 0 then break end
      for _, m in ipairs(batch) do
        if n < cap then break end
        if redis.call('EXISTS', prefix .. ':lease:' .. m) == 1 then
          skipped = skipped + 1
        else
          local blob = redis.call('GET', prefix .. ':state:' .. m)
          if blob then
            redis.call('DEL', prefix .. ':state:' .. m)
            table.insert(dropped, blob)
          end
          forget(prefix, KEYS[2], m)
          n = n - 1
        end
      end
    end
  end
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[2], now, member)  -- µs since 1970: exact in a double
redis.call('ZADD', KEYS[3], now, ARGV[5])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) else redis.call('PERSIST', KEYS[3]) end
return dropped
"""

# KEYS: state, lru, ids. ARGV: member, id. Returns the state deleted (or nil).
DELETE_LUA = """
local blob = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
return blob
"""

# KEYS: ids, lru. ARGV: prefix, tenant. Returns the tenant's states, least recently used first.
LIST_LUA = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local blob = redis.call('GET', ARGV[1] .. ':state:' .. ARGV[2] .. ':' .. id)
  if blob then
    table.insert(out, blob)
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], ARGV[2] .. ':' .. id)
  end
end
return out
"""

# KEYS: lru. ARGV: ttl_ms, prefix. Returns the number of live sessions.
COUNT_LUA = _LUA_COMMON + """
prune(ARGV[2], KEYS[1], tonumber(ARGV[1]), now_us())
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: lease. ARGV: token. Deletes the lease only if it is still this holder's.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _check_tenant(tenant: str) -> str:
    if not tenant or ":" in tenant:
        raise ValueError(f"session store tenant {tenant!r}: must be non-empty, without ':'")
    return tenant


class RedisStore(SessionStore):
    name = "redis"

    def __init__(self, url: str, limits: StoreLimits | None = None,
                 on_drop: Callable[[SessionState, str], None] | None = None,
                 prefix: str = PREFIX):
        super().__init__(limits, on_drop)
        self.url = url
        self.prefix = prefix
        self._client = aioredis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                               socket_connect_timeout=SOCKET_TIMEOUT_S)
        self._put_script = self._client.register_script(PUT_LUA)
        self._delete_script = self._client.register_script(DELETE_LUA)
        self._list_script = self._client.register_script(LIST_LUA)
        self._count_script = self._client.register_script(COUNT_LUA)
        self._release_script = self._client.register_script(RELEASE_LUA)

    # -- keys ------------------------------------------------------------------
    def _state_key(self, tenant: str, session_id: str) -> str:
        return f"{self.prefix}:state:{_check_tenant(tenant)}:{session_id}"

    def _lease_key(self, tenant: str, session_id: str) -> str:
        return f"{self.prefix}:lease:{_check_tenant(tenant)}:{session_id}"

    def _ids_key(self, tenant: str) -> str:
        return f"{self.prefix}:ids:{_check_tenant(tenant)}"

    @property
    def _lru_key(self) -> str:
        return f"{self.prefix}:lru"

    @property
    def _ttl_ms(self) -> int:
        return int(self.limits.ttl * 1000) if self.limits.ttl else 0

    # -- the interface ---------------------------------------------------------
    async def get(self, tenant, session_id):
        blob = await self._client.get(self._state_key(tenant, session_id))
        return None if blob is None else state_from_bytes(blob)

    async def put(self, state):
        fault_point("store-put-before")  # the engine answered; nothing written yet
        keys = [self._state_key(state.tenant, state.id), self._lru_key, self._ids_key(state.tenant)]
        args = [state_bytes(state), self._ttl_ms, self.limits.max_sessions or 0,
                f"{state.tenant}:{state.id}", state.id, self.prefix]
        if fault_due("store-put-mid"):
            await self._send_half_and_crash(keys, args)
        for blob in await self._put_script(keys=keys, args=args):
            self._dropped(state_from_bytes(blob), "lru")

    async def _send_half_and_crash(self, keys: list, args: list) -> None:
        """The fault hook's death in the middle of the write: the put's command
        is on its way to Redis, half of its bytes sent, when the process dies."""
        conn = self._client.connection_pool.make_connection()
        await conn.connect()
        packed = b"".join(conn.pack_command("EVAL", PUT_LUA, len(keys), *keys, *args))
        await conn.send_packed_command(packed[: len(packed) // 2], check_health=False)
        crash()

    async def delete(self, tenant, session_id):
        blob = await self._delete_script(
            keys=[self._state_key(tenant, session_id), self._lru_key, self._ids_key(tenant)],
            args=[f"{tenant}:{session_id}", session_id])
        if blob is None:
            return None
        self.counters.deleted += 1
        return state_from_bytes(blob)

    async def lease(self, tenant, session_id):
        seconds = self.limits.lease_seconds
        lease = Lease(tenant, session_id, uuid.uuid4().hex, time.time() + seconds)
        taken = await self._client.set(self._lease_key(tenant, session_id), lease.token, nx=True,
                                       px=max(1, round(seconds * 1000)))
        return lease if taken else None

    async def release(self, lease):
        await self._release_script(keys=[self._lease_key(lease.tenant, lease.session_id)],
                                   args=[lease.token])

    async def list(self, tenant):
        blobs = await self._list_script(keys=[self._ids_key(tenant), self._lru_key],
                                        args=[self.prefix, tenant])
        return [state_from_bytes(b) for b in blobs]

    async def count(self):
        return int(await self._count_script(keys=[self._lru_key], args=[self._ttl_ms, self.prefix]))

    async def close(self):
        await self._client.aclose()
