"""`GET` and `DELETE /v1/sessions/{id}`: a session as JSON, and forgetting one;
`GET /v1/sessions/{id}/view` and `GET /v1/sessions`: the same, as the memory
inspector's HTML pages (`server.inspector`) for an operator's browser.

A session belongs to the API key that made it (its tenant): another key gets
404, exactly as for a session that does not exist, and the list shows the
asking key's sessions only. GET shows what the session holds: its retained
tokens with their current scores (bounded by the budget), never a message
list (a session keeps none).
"""

from __future__ import annotations

from sir_vllm.server import inspector
from sir_vllm.sessions import SessionService, SessionState

PREFIX = "/v1/sessions/"
LIST_PATH = inspector.LIST_PATH
VIEW_SUFFIX = "/view"
# The pages run no script and load nothing: a CSP that says so turns any escaping
# slip into text shown, never code run.
HTML_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                 b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store")]  # a session's text is private to its key


def describe(state: SessionState, tokenizer, kv_bytes_per_token: int | None) -> dict:
    head = state.head
    return {
        "id": state.id, "api": state.api, "turns": head.turns,
        "retained_tokens": head.size,
        "retained_bytes": None if kv_bytes_per_token is None else head.size * kv_bytes_per_token,
        "evicted_tokens": head.evicted_total, "budget": state.policy.cache_size,
        "policy": state.policy.to_dict(), "pending_token": head.pending,
        "messages_consumed": head.messages, "rollback_turns_available": len(state.history),
        "created": state.created, "last_used": state.last_used,
        "tokens": [{"id": int(t), "text": tokenizer.decode([int(t)]), "score": float(s)}
                   for t, s in zip(head.token_ids, head.scores)],
    }


async def handle(service: SessionService, method: str, tenant: str, session_id: str, tokenizer,
                 kv_bytes_per_token: int | None) -> tuple[int, dict]:
    """(status, JSON body) for a request on /v1/sessions/{session_id}."""
    from sir_vllm.sessions import SessionError

    if method == "GET":
        state = await service.get(tenant, session_id)
        if state is None:
            return 404, error(404, f"no session {session_id!r}")
        return 200, describe(state, tokenizer, kv_bytes_per_token)
    if method == "DELETE":
        try:
            await service.delete(tenant, session_id)
        except SessionError as e:
            return e.status, error(e.status, str(e))
        return 200, {"id": session_id, "deleted": True}
    return 405, error(405, "use GET or DELETE")


def page_of(method: str | None, path: str) -> tuple[str, str | None] | None:
    """The inspector page a request asks for: ("list", None), ("view", session id
    as sent) or None (the JSON endpoint's). Only a GET ending in /view is a view,
    so DELETE /v1/sessions/a/view still forgets the session "a/view"."""
    if path == LIST_PATH:
        return "list", None
    if (method == "GET" and path.startswith(PREFIX) and path.endswith(VIEW_SUFFIX)
            and len(path) > len(PREFIX) + len(VIEW_SUFFIX)):
        return "view", path[len(PREFIX):-len(VIEW_SUFFIX)]
    return None


async def render_page(service: SessionService, method: str | None, tenant: str,
                      which: tuple[str, str | None], tokenizer) -> tuple[int, str]:
    """(status, HTML) for an inspector page (`page_of`)."""
    from sir_vllm.server.requests import check_session_id
    from sir_vllm.sessions import SessionError

    kind, sid = which
    if method != "GET":
        return 405, inspector.render_error(405, "use GET")
    if kind == "list":
        return 200, inspector.render_list(await service.store.list(tenant))
    try:
        sid = check_session_id(sid)
    except SessionError as e:
        return e.status, inspector.render_error(e.status, str(e))
    state = await service.get(tenant, sid)
    if state is None:
        return 404, inspector.render_error(404, f"no session {sid!r}")
    return 200, inspector.render_session(state, tokenizer)


async def send_html(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*HTML_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error(status: int, message: str) -> dict:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            405: "MethodNotAllowed", 409: "ConflictError"}.get(status, "Error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
