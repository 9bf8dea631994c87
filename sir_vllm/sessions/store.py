"""Sessions by (tenant, id). A tenant is the hash of the request's API key, so one
key can neither continue nor read another key's session."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field

from sir_vllm.policy import SessionScores


class SessionBusy(RuntimeError):
    """A second request on a session whose turn is still running (HTTP 409)."""


@dataclass
class Session:
    id: str
    tenant: str
    policy: object
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # engine-side key + cache salt
    token_ids: list[int] = field(default_factory=list)  # cached tokens (KV pinned in the engine)
    pending: int | None = None  # last sampled token: no KV yet, leads the next prompt
    scores: SessionScores = field(default_factory=SessionScores)
    messages: list[dict] = field(default_factory=list)  # chat history consumed so far ({role, content})
    answer_ids: list[int] | None = None  # the last turn's generated ids (a chat turn's closing text)
    api: str | None = None  # "chat" or "completions": the API the session was started on
    evicted_total: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def turns(self) -> int:
        return self.scores.turns

    @property
    def cache_salt(self) -> str:
        # Compacted KV is not a function of its tokens: never share blocks across sessions.
        return f"sir-{self.key}"


def tenant_of(api_key: str | None) -> str:
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:16]


class SessionStore:
    def __init__(self):
        self._sessions: dict[tuple[str, str], Session] = {}

    def get(self, tenant: str, session_id: str) -> Session | None:
        return self._sessions.get((tenant, session_id))

    def get_or_create(self, tenant: str, session_id: str, policy) -> tuple[Session, bool]:
        s = self.get(tenant, session_id)
        if s is not None:
            return s, False
        s = Session(id=session_id, tenant=tenant, policy=policy)
        self._sessions[(tenant, session_id)] = s
        return s, True

    def drop(self, tenant: str, session_id: str) -> Session | None:
        return self._sessions.pop((tenant, session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)
