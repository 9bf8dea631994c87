"""Chat sessions: how a request's messages relate to what the session consumed.

The conversation is what the client sends; session memory is a cache of it.
A session keeps no message list, only a hash chain over the messages it has
consumed (role and text, whitespace at the ends aside) at each of its last
turns. A request's messages are resolved against that chain:

1. they extend the history at the session's current turn: **continue**, the
   known part is skipped (the whole-history form);
2. they extend the history as it stood at one of the last K turns (the client
   pressed "regenerate", or edited a recent message): **roll back** to the
   state of that turn and continue from there (`rolled_back_turns`);
3. they hold no assistant message: they are all new, **continue** (the
   only-new form: a client never writes the session's own answers). A request
   of one user message is always read this way, so a session id reused for a
   new conversation answers its first message from the old memory; its next
   request (a whole history) rebuilds it;
4. anything else (an edit older than K turns, an id reused for another
   conversation): **rebuild**, a fresh state under the same id with the whole
   history as its first turn, never the old memory answering a different one.

The turn's new messages may end with any role: as on a stateless server, the
model answers after them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sir_vllm.sessions.state import ROOT_CHAIN, SessionState, Snapshot

ROLES = ("system", "user", "assistant")
CONTINUE, ROLLBACK, REBUILD, NEW = "continue", "rollback", "rebuild", "new"


class ChatError(ValueError):
    """A chat request a session cannot take (HTTP 400)."""


def _text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatError(f"messages[{i}].content: only text parts are supported in a session, "
                                f"got {kind!r}")
        return "\n".join(texts)  # as vLLM joins text parts for string-content templates
    raise ChatError(f"messages[{i}].content must be a string or a list of text parts")


def normalize_messages(messages) -> list[dict]:
    """[{"role", "content": str}] from an OpenAI messages list; ChatError if unusable."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"  # OpenAI's newer name for the system role
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role: a session takes {', '.join(ROLES)} messages, got {role!r}")
        if m.get("tool_calls") or m.get("function_call"):
            raise ChatError(f"messages[{i}]: tool calls are not supported in a session")
        content = m.get("content")
        if content is None:
            raise ChatError(f"messages[{i}].content is missing")
        out.append({"role": role, "content": _text(content, i)})
    return out


def chain_step(chain: str, message: dict) -> str:
    """The hash chain after one more message."""
    h = hashlib.sha256()
    for part in (chain, message["role"], message["content"].strip()):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def chain_of(messages: list[dict], start: str = ROOT_CHAIN) -> list[str]:
    """[chain after 0 messages, after 1, ..., after all]."""
    out = [start]
    for m in messages:
        out.append(chain_step(out[-1], m))
    return out


@dataclass(frozen=True)
class Resolution:
    kind: str  # continue | rollback | rebuild | new
    new: list[dict]  # the messages this turn renders
    rolled_back: int = 0  # turns undone (rollback)


def resolve(state: SessionState | None, messages: list[dict]) -> Resolution:
    """How `messages` (normalized) continue `state` (see the module doc)."""
    if state is None or state.turns == 0:
        return Resolution(NEW, messages)
    chain = chain_of(messages)
    points: list[Snapshot] = [state.head, *reversed(state.history)]
    for steps, snap in enumerate(points):
        if 0 < snap.messages < len(messages) and chain[snap.messages] == snap.chain:
            return Resolution(CONTINUE if steps == 0 else ROLLBACK, messages[snap.messages:], steps)
    if not any(m["role"] == "assistant" for m in messages):
        return Resolution(CONTINUE, messages)
    return Resolution(REBUILD, messages)
