"""A session's state: what the API side keeps between turns, and nothing more.

Session memory is a cache of the conversation. The engine's pinned KV is the
fast tier; this state is the tier below it: the retained token ids and their
scores (from which the KV can always be recomputed), the pending token, and
for chat sessions a hash chain of the messages consumed (to tell a continued
conversation from a regenerated, edited or different one). Its size is
bounded by the policy's budget, whatever the conversation's length: a
`Snapshot` per turn, and the last K snapshots for rollback.

`to_dict`/`from_dict` give a JSON-able form for session stores that live
outside this process.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field, replace

import numpy as np

from sir_vllm.policy import make_policy

ROOT_CHAIN = ""  # the hash chain of no messages
ANSWER_TAIL = 8  # tokens of the last answer kept: enough to tell its end-of-message text
TRACE_TURNS = 256  # turns of (turn, retained, evicted so far) kept for the inspector's chart


@dataclass(frozen=True)
class Snapshot:
    """The session right after one turn (or empty, before its first)."""

    turns: int = 0
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    pending: int | None = None  # last sampled token: no KV yet, leads the next prompt
    answer_tail: tuple[int, ...] | None = None  # the turn's last generated ids (None: none yet)
    evicted_total: int = 0
    turn_id: str | None = None  # the engine turn whose pins hold token_ids
    messages: int = 0  # chat messages consumed up to here
    chain: str = ROOT_CHAIN  # hash chain of those messages

    def __post_init__(self):
        assert len(self.token_ids) == len(self.scores), (len(self.token_ids), len(self.scores))

    @property
    def size(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        return {
            "turns": self.turns, "token_ids": _pack(self.token_ids, np.int32),
            "scores": _pack(self.scores, np.float64), "pending": self.pending,
            "answer_tail": None if self.answer_tail is None else list(self.answer_tail),
            "evicted_total": self.evicted_total, "turn_id": self.turn_id,
            "messages": self.messages, "chain": self.chain,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Snapshot:
        tail = d.get("answer_tail")
        return cls(turns=int(d["turns"]), token_ids=_unpack(d["token_ids"], np.int32).astype(np.int64),
                   scores=_unpack(d["scores"], np.float64), pending=d.get("pending"),
                   answer_tail=None if tail is None else tuple(int(t) for t in tail),
                   evicted_total=int(d.get("evicted_total", 0)), turn_id=d.get("turn_id"),
                   messages=int(d.get("messages", 0)), chain=str(d.get("chain", ROOT_CHAIN)))


@dataclass
class SessionState:
    """One session: who owns it, its policy, its current snapshot and the last K before it."""

    id: str
    tenant: str
    key: str  # engine-side key: pins and cache salt (never the client's id)
    policy: object
    api: str | None = None  # "chat" or "completions": the API the session was started on
    head: Snapshot = field(default_factory=Snapshot)
    history: tuple[Snapshot, ...] = ()  # earlier heads, oldest first (rollback points)
    trace: tuple[tuple[int, int, int], ...] = ()  # (turn, retained, evicted so far), the last ones
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    @property
    def turns(self) -> int:
        return self.head.turns

    @property
    def cache_salt(self) -> str:
        # Compacted KV is not a function of its tokens: never share blocks across sessions.
        return f"sir-{self.key}"

    def advanced(self, snapshot: Snapshot, keep_history: int, api: str) -> SessionState:
        """The state after a committed turn: `snapshot` becomes the head, the old
        head joins the rollback history (at most `keep_history` kept)."""
        history = (*self.history, self.head)[-keep_history:] if keep_history > 0 else ()
        if self.head.turns == 0:
            history = ()  # the empty start is no rollback point (a rebuild covers it)
        point = (snapshot.turns, snapshot.size, snapshot.evicted_total)
        trace = (*[t for t in self.trace if t[0] < snapshot.turns], point)[-TRACE_TURNS:]
        return replace(self, head=snapshot, history=history, api=api, trace=trace,
                       last_used=time.time())

    def rolled_back(self, steps: int) -> SessionState:
        """The state as it was `steps` turns ago (1 <= steps <= len(history))."""
        assert 1 <= steps <= len(self.history), (steps, len(self.history))
        return replace(self, head=self.history[-steps], history=self.history[:-steps])

    def to_dict(self) -> dict:
        return {"id": self.id, "tenant": self.tenant, "key": self.key,
                "policy": self.policy.to_dict(), "api": self.api, "head": self.head.to_dict(),
                "history": [s.to_dict() for s in self.history],
                "trace": [list(t) for t in self.trace], "created": self.created,
                "last_used": self.last_used}

    @classmethod
    def from_dict(cls, d: dict) -> SessionState:
        return cls(id=d["id"], tenant=d["tenant"], key=d["key"], policy=make_policy(**d["policy"]),
                   api=d.get("api"), head=Snapshot.from_dict(d["head"]),
                   history=tuple(Snapshot.from_dict(s) for s in d.get("history", ())),
                   trace=tuple(tuple(int(x) for x in t) for t in d.get("trace", ())),
                   created=float(d.get("created", 0.0)), last_used=float(d.get("last_used", 0.0)))

    def approx_bytes(self) -> int:
        """What the state costs to keep: its arrays (ids 4 bytes, scores 8) per snapshot."""
        return sum(12 * s.size + 64 for s in (self.head, *self.history)) + 256


def _pack(arr: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def _unpack(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()
