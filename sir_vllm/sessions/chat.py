"""Chat-API sessions: which messages of a request are new to the session.

A session remembers the messages it has consumed, including the assistant
answers it produced (as the text it returned). A request's messages are read
as follows:

1. they start with that history and add at least one message: the known part
   is skipped, the rest is new (the whole-history form; a new session's
   history is empty, so its whole list is the first turn);
2. otherwise, if they hold no assistant message: they are all new (the
   only-new form: a client never writes the session's own answers);
3. otherwise they contradict the history (an edited or truncated history, a
   regenerated answer): ChatError, HTTP 400, never a silent wrong answer.

The new messages must end with a user or system message (the turn answers
them); assistant messages may appear among them only in the whole-history form.
Messages are compared by role and text content only (leading and trailing
whitespace aside); the tokens of what was consumed are the session's own
record, so the comparison only decides which messages are new.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


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
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role: a session takes {', '.join(ROLES)} messages, got {role!r}")
        if m.get("tool_calls") or m.get("function_call"):
            raise ChatError(f"messages[{i}]: tool calls are not supported in a session")
        content = m.get("content")
        if content is None:
            raise ChatError(f"messages[{i}].content is missing")
        out.append({"role": role, "content": _text(content, i)})
    return out


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def new_messages(history: list[dict], messages: list[dict], session_id: str = "") -> list[dict]:
    """The messages of a request the session has not consumed yet (see the module doc)."""
    n = len(history)
    if len(messages) > n and all(_same(a, b) for a, b in zip(history, messages)):
        new = messages[n:]
    elif not any(m["role"] == "assistant" for m in messages):
        new = messages
    else:
        same = next((i for i, (a, b) in enumerate(zip(history, messages)) if not _same(a, b)),
                    min(len(history), len(messages)))
        if len(messages) <= n and same == len(messages):
            why = f"they repeat the first {len(messages)} of its {n} messages and add nothing new"
        else:
            why = f"message {same} differs from the session's message {same} ({n} messages so far)"
        raise ChatError(
            f"messages contradict session {session_id!r}: {why}. Send either the whole history "
            "as returned so far plus new messages, or only the new messages (no assistant message)")
    if new[-1]["role"] == "assistant":
        raise ChatError("the last new message is an assistant message; a session turn answers "
                        "a user or system message (continuing an assistant message is not supported)")
    return new
