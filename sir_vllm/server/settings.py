"""The server-wide session settings, set once at start-up in the API process.

`vllm serve` builds its ASGI middleware by import path with no arguments, so
the flags hand the policy, the model's tokenizer path and the session limits
over through here. Each session limit is one field below whose metadata holds
its `vllm serve` flag (`server.flags` generates, validates and applies the
flags from them): adding a setting is one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from sir_vllm.connector.admission import parse_max_running
from sir_vllm.connector.offload import parse_offload_bytes


@dataclass(frozen=True)
class SessionFlag:
    """How one session setting is given on `vllm serve`."""

    flag: str
    metavar: str
    help: str  # one line, without the default
    type: type = int  # parses the command-line string
    minimum: float | None = 0  # smallest value accepted (numbers only)
    choices: tuple | None = None
    default_text: str | None = None  # the default in words, where the value alone does not say it


def _flag(**kwargs) -> dict:
    return {"flag": SessionFlag(**kwargs)}


@dataclass
class Settings:
    policy: object = None  # the server's default Policy
    tokenizer: str | None = None  # path or name, as vLLM loads it
    api_keys: tuple[str, ...] = ()
    # K and V of every layer, in the KV cache dtype; None until filled at runtime
    # from the engine's VllmConfig (vllm_adapter.kv_bytes_per_token).
    kv_bytes_per_token: int | None = None
    # The context length; --max-model-len, else None until filled at runtime
    # from the engine's config (vllm_adapter.scheduler_limits). Feeds budget_limit.
    max_model_len: int | None = None
    # --chat-template, loaded as vLLM loads it (file, built-in name or inline
    # Jinja); None: the tokenizer's own template.
    chat_template: str | None = None
    # What session keys are scoped by besides the API key: the served model, so
    # servers of two models sharing one store never continue each other's sessions.
    namespace: str = ""

    # -- session settings: one field each, with the flag that sets it ----------
    max_sessions: int | None = field(default=None, metadata=_flag(
        flag="--kv-max-sessions", metavar="N", minimum=1,
        help="Sessions the API process keeps at once",
        default_text="derived at runtime from the KV pool and the budget"))
    session_ttl: float = field(default=86400.0, metadata=_flag(
        flag="--kv-session-ttl", metavar="SECONDS", type=float,
        help="Seconds a session may stay idle before it expires; 0: never",
        default_text="86400, one day"))
    rollback_turns: int = field(default=4, metadata=_flag(
        flag="--kv-rollback-turns", metavar="K",
        help="Turns a chat session can roll back, for a regenerated or edited message; 0: none"))
    session_store: str | None = field(default=None, metadata=_flag(
        flag="--kv-session-store", metavar="STORE", type=str, minimum=None,
        help="Where session state lives: memory (this process only, lost at exit), "
             "sqlite[:PATH] (a file; survives restarts, shared by the API processes of a host), "
             "redis://HOST:PORT/DB (shared by processes, hosts and replicas)",
        default_text="sqlite, a file under the cache folder (~/.cache/sir-vllm/sessions.sqlite3)"))
    max_turn_tokens: int = field(default=4_194_304, metadata=_flag(
        flag="--kv-max-turn-tokens", metavar="N", minimum=1,
        help="Largest turn a session takes, its new tokens plus max_tokens; a longer one is a 400 "
             "(a turn too long for the budget runs in chunks and segments)",
        default_text="4194304"))
    chunk_tokens: int | None = field(default=None, metadata=_flag(
        flag="--kv-chunk-tokens", metavar="N", minimum=1,
        help="Tokens per pass of a turn too long for the budget (input chunks, answer segments)",
        default_text="a quarter of the room the budget leaves beside the sinks, at most half of it"))
    max_running: int | str = field(default=0, metadata=_flag(
        flag="--kv-max-running", metavar="N|auto", type=parse_max_running, minimum=None,
        help="Under KV-pool pressure, session turns that may run while a turn that would drop "
             "idle sessions' pinned KV waits for them instead; auto: as many as half the pool "
             "holds; 0: off, such a turn runs at once and the idle pins go",
        default_text="0, off"))
    offload_bytes: int = field(default=0, metadata=_flag(
        flag="--kv-offload-bytes", metavar="BYTES", type=parse_offload_bytes, minimum=None,
        help="Host memory for the KV of sessions whose pinned KV the full pool drops, so their "
             "next turn copies its kept tokens back instead of recomputing them (least recently "
             "saved go first); sizes as --kv-cache-memory-bytes takes them (2G); 0: off",
        default_text="0, off"))
    max_budget: int | None = field(default=None, metadata=_flag(
        flag="--kv-max-budget", metavar="N", minimum=1,
        help="Largest budget (cache_size, in tokens) a request's kv_policy may ask for",
        default_text="the larger of the server's own budget and the context length, "
                     "beyond which a budget never evicts"))

    def budget_limit(self) -> int | None:
        """The largest per-request budget: --kv-max-budget, else the larger of
        the server's budget and the context length (None before configure)."""
        if self.max_budget is not None:
            return self.max_budget
        own = getattr(self.policy, "cache_size", None)
        if own is None:
            return None
        return max(own, self.max_model_len or 0)


def session_settings() -> list[tuple[str, object, SessionFlag]]:
    """(field name, default, flag) of every session setting, in field order."""
    return [(f.name, f.default, f.metadata["flag"]) for f in fields(Settings) if "flag" in f.metadata]


current = Settings()


def configure(policy, args, *, chat_template: str | None = None, **session) -> None:
    """Store what the flags resolved (`server.flags.apply_kv_policy_args`).

    `session` holds the session settings by field name, already validated;
    the bytes per cached token stay None here: the engine's config, known only
    at runtime, has the KV cache dtype.
    """
    unknown = set(session) - {name for name, _, _ in session_settings()}
    if unknown:
        raise TypeError(f"not session settings: {', '.join(sorted(unknown))}")
    current.policy = policy
    current.tokenizer = getattr(args, "tokenizer", None) or getattr(args, "model", None)
    current.api_keys = tuple(k for k in (getattr(args, "api_key", None) or []) if k)
    current.kv_bytes_per_token = None
    max_len = getattr(args, "max_model_len", None)  # vLLM reads "auto" as -1
    current.max_model_len = max_len if isinstance(max_len, int) and max_len > 0 else None
    current.chat_template = chat_template
    served = getattr(args, "served_model_name", None)
    current.namespace = str((served or [None])[0] or getattr(args, "model", "") or "")
    for name, default, _ in session_settings():
        setattr(current, name, session.get(name, default))
