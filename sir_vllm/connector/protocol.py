"""What the API process and the engine's connector say to each other, typed.

Three messages, each with one builder and one reader here (and nowhere else):

* `TurnParams`, API -> engine, inside a request's `kv_transfer_params` (it
  travels through vLLM's HTTP layer as JSON): which session the request is a
  turn of, which of the session's cached tokens it keeps, and which earlier
  turn's pinned KV it expects (`expect`). A turn id is fresh for every engine
  request, so pins left by another turn (a rolled-back one, a crashed API
  process, another replica's) never pass for the ones the API expects: the
  engine then recomputes the kept tokens from their ids. A long turn's passes
  pin under a key of their own (`source` says where a pass loads from), so
  the session's own pins stay as they were until its last pass succeeds.
* `TurnReply`, engine -> API, in the response's `kv_transfer_params` (non-
  streaming) or from `EngineQuery.REPLY` (streaming responses carry no
  `kv_transfer_params` in vLLM 0.32).
* Engine queries, API -> EngineCore through vLLM's utility-call channel
  (`vllm_adapter.call_engine_utility`): drop sessions' pins without a forward
  pass, fetch a turn's reply, read the pool's session statistics.

Clients never write PARAMS_KEY: the session layer refuses it in a request.
This module imports nothing from vLLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PARAMS_KEY = "sir_session"
REPLY_KEY = "sir_reply"
ENGINE_UTILITY = "sir_vllm_sessions"  # the EngineCore method the connector installs


class ProtocolError(ValueError):
    """A message that does not parse (never a client's fault: our own two ends disagree)."""


@dataclass(frozen=True)
class TurnParams:
    key: str  # the session's engine-side key (pins; also its cache salt)
    turn: str  # this request's turn id: the pins it leaves are tagged with it
    old_len: int  # cached tokens of the state this turn starts from
    keep: list[int] | None = None  # ascending indices into those tokens; None: all of them
    expect: str | None = None  # the turn id whose pins hold those tokens (None: nothing pinned)
    name: str = ""  # the client's session id, for log lines only
    peek: bool = False  # score only: pin nothing, release nothing
    source: str | None = None  # the key whose pins this turn loads from (None: `key`)
    release_source: bool = False  # free the source's pins once this turn has pinned its own

    @property
    def load_key(self) -> str:
        return self.source or self.key

    def keep_indices(self) -> list[int]:
        return list(range(self.old_len)) if self.keep is None else list(self.keep)

    def to_kv_transfer_params(self, other: dict | None = None) -> dict:
        return {**(other or {}), PARAMS_KEY: asdict(self)}

    @classmethod
    def from_kv_transfer_params(cls, params) -> TurnParams | None:
        """The session turn a request's `kv_transfer_params` describe, or None."""
        raw = params.get(PARAMS_KEY) if isinstance(params, dict) else None
        if raw is None:
            return None
        try:
            keep = raw.get("keep")
            return cls(key=str(raw["key"]), turn=str(raw["turn"]), old_len=int(raw["old_len"]),
                       keep=None if keep is None else [int(i) for i in keep],
                       expect=None if raw.get("expect") is None else str(raw["expect"]),
                       name=str(raw.get("name", "")), peek=bool(raw.get("peek", False)),
                       source=None if raw.get("source") is None else str(raw["source"]),
                       release_source=bool(raw.get("release_source", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"bad {PARAMS_KEY} in kv_transfer_params: {e}") from None


@dataclass(frozen=True)
class TurnReply:
    pinned: int  # tokens of this turn whose KV the engine now pins (0 for a peek)
    recomputed: int = 0  # kept tokens whose pins were missing: rebuilt from their ids

    def to_kv_transfer_params(self) -> dict:
        return {REPLY_KEY: asdict(self)}

    @classmethod
    def from_kv_transfer_params(cls, params) -> TurnReply | None:
        raw = params.get(REPLY_KEY) if isinstance(params, dict) else None
        return None if raw is None else cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw) -> TurnReply | None:
        if raw is None:
            return None
        try:
            return cls(pinned=int(raw["pinned"]), recomputed=int(raw.get("recomputed", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad {REPLY_KEY}: {e}") from None


@dataclass(frozen=True)
class PoolStats:
    """The engine's view of session pins (EngineQuery.STATS)."""

    pinned_sessions: int = 0
    pinned_blocks: int = 0
    free_blocks: int | None = None
    total_blocks: int = 0
    dropped_total: int = 0  # pins dropped for pool pressure since start
    block_size: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> PoolStats:
        known = {k: raw[k] for k in ("pinned_sessions", "pinned_blocks", "free_blocks",
                                     "total_blocks", "dropped_total", "block_size") if k in raw}
        return cls(**known, extra={k: v for k, v in raw.items() if k not in known})


class EngineQuery:
    """Commands of the engine utility: `(command, argument)` pairs, plain data."""

    DROP = "drop"  # argument: list of session keys -> number of sessions whose pins were freed
    MOVE = "move"  # argument: [from key, to key] -> the pins (or their saved copy) now under `to`
    REPLY = "reply"  # argument: turn id -> TurnReply as a dict, or None
    STATS = "stats"  # argument: None -> PoolStats as a dict
