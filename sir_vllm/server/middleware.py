"""The session layer of the API server: an ASGI middleware (`vllm serve --middleware`).

A thin adapter. Requests without a session id pass through untouched (stock
vLLM). A request with one (`session_id` body field or `X-Session-ID` header)
on `/v1/completions` or `/v1/chat/completions` is checked
(`server.requests`), run as a turn of that session by the sessions service
(`sessions.service`, with vLLM's own completions endpoint as its engine:
`server.engine_call`), and answered in the OpenAI format the client asked
for (`server.openai_format`), whole or streamed. `/v1/sessions/{id}` shows or
deletes a session, `/v1/sessions/{id}/view` and `/v1/sessions` are its HTML
inspector (`server.session_endpoints`). vLLM's own API-key check runs
before anything here reads a body.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from functools import cached_property

from sir_vllm import vllm_adapter
from sir_vllm.server import metrics as server_metrics
from sir_vllm.server import requests as turn_requests
from sir_vllm.server import session_endpoints, settings
from sir_vllm.server.engine_call import AppEngine, ClientContext, replay
from sir_vllm.server.openai_format import DONE, ChatStream, CompletionStream, chat_response, \
    completion_response, sse
from sir_vllm.sessions import (ServiceConfig, SessionError, SessionService, StoreLimits, make_store,
                               tenant_of)
from sir_vllm.sessions.engine import EngineError, EngineStreamError
from sir_vllm.sessions.store import DEFAULT_STORE
from sir_vllm.sessions.service import CHAT

logger = logging.getLogger("vllm.sir_vllm.sessions")

COMPLETIONS = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
SESSION_HEADER = b"x-session-id"
RETAINED_HEADER = "x-session-retained-tokens"
REPLICA_HEADER = b"x-sir-replica"  # which server process answered a session request
MIN_DEFAULT_SESSIONS = 1024


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _api_key(scope) -> str | None:
    auth = _header(scope, b"authorization") or ""
    return auth[7:] if auth.lower().startswith("bearer ") else None


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def send_json(send, status: int, payload: dict, headers: dict | None = None) -> None:
    body = json.dumps(payload).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def with_header(send, name: bytes, value: bytes):
    """`send` that adds one header to the response it starts."""
    async def sending(msg):
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), (name, value)]}
        await send(msg)
    return sending


def default_max_sessions(vllm_config, policy) -> int:
    """8 x the sessions the KV pool can pin at the budget, at least MIN_DEFAULT_SESSIONS
    (a state costs a few KB; sessions beyond the pool recompute their kept tokens)."""
    pool = vllm_adapter.pool_tokens(vllm_config) if vllm_config is not None else None
    if not pool or not policy.cache_size:
        return MIN_DEFAULT_SESSIONS
    return max(MIN_DEFAULT_SESSIONS, 8 * pool // policy.cache_size)


class SessionMiddleware:
    def __init__(self, app):
        self.app = app
        self.engine = AppEngine(app)
        self.service: SessionService | None = None
        self.metrics: server_metrics.SessionMetrics | None = None  # made with the service
        self._guarded = None  # our dispatch behind vLLM's API-key check (built at first request)
        self.replica = os.environ.get("SIR_VLLM_REPLICA", f"{socket.gethostname()}:{os.getpid()}").encode()

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(settings.current.tokenizer)

    @cached_property
    def renderer(self):
        from sir_vllm.chat import ChatRenderer

        return ChatRenderer(self.tokenizer, settings.current.chat_template)

    def _service_for(self, scope) -> SessionService:
        if self.service is None:
            self.engine.bind(scope)
            if settings.current.policy is None:  # a spawned API server process: same flags
                from sir_vllm.server.flags import configure_from_args

                configure_from_args(vllm_adapter.app_state(scope).args)
            cfg = settings.current
            config = vllm_adapter.vllm_config_of(scope)
            if config is not None:  # what only the engine knows: its KV layout, its context
                cfg.kv_bytes_per_token = vllm_adapter.kv_bytes_per_token(config)
                cfg.max_model_len = cfg.max_model_len or vllm_adapter.scheduler_limits(config)[0]
            max_sessions = cfg.max_sessions or default_max_sessions(config, cfg.policy)
            limits = StoreLimits(max_sessions=max_sessions, ttl=float(cfg.session_ttl or 0))
            self.metrics = server_metrics.session_metrics(
                vllm_adapter.served_model_name(config) or cfg.namespace)
            store = self.metrics.metered(make_store(cfg.session_store or DEFAULT_STORE, limits))
            config = ServiceConfig(cfg.policy, cfg.rollback_turns, max_turn_tokens=cfg.max_turn_tokens,
                                   chunk_tokens=cfg.chunk_tokens, window=cfg.max_model_len,
                                   vocab_size=len(self.tokenizer))
            service = SessionService(store, self.engine, config, renderer=lambda: self.renderer,
                                     tokenizer=lambda: self.tokenizer)
            store.on_drop = service.on_store_drop
            self.service = service
            logger.info("sir-vllm: sessions in the %s store, at most %d, idle TTL %.0fs",
                        store.name, max_sessions, limits.ttl)
        return self.service

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.rstrip("/") == server_metrics.METRICS_PATH:
            await self._refresh_metrics(scope)  # then vLLM's own /metrics answers
        ours = scope["type"] == "http" and (
            path.startswith(session_endpoints.PREFIX) or path == session_endpoints.LIST_PATH
            or (scope.get("method") == "POST" and path in (COMPLETIONS, CHAT_PATH)))
        if not ours:
            return await self.app(scope, receive, send)
        if self._guarded is None:
            state = vllm_adapter.app_state(scope)
            tokens = vllm_adapter.api_tokens(getattr(state, "args", None))
            self._guarded = vllm_adapter.authenticated(self._dispatch, tokens)
        return await self._guarded(scope, receive, send)

    async def _refresh_metrics(self, scope) -> None:
        """The gauges read at scrape time (`server.metrics`); a failure never fails /metrics."""
        try:
            service = self._service_for(scope)
            await self.metrics.refresh(service.store, service.engine)
        except Exception as e:
            logger.warning("sir-vllm: /metrics: the session gauges were not refreshed: %s", e)

    async def _dispatch(self, scope, receive, send):
        path = scope["path"]
        service = self._service_for(scope)
        tenant = tenant_of(_api_key(scope), settings.current.namespace)
        stock_send, send = send, with_header(send, REPLICA_HEADER, self.replica)
        page = session_endpoints.page_of(scope.get("method"), path)
        if page is not None:  # the memory inspector's HTML pages
            status, html = await session_endpoints.render_page(
                service, scope.get("method"), tenant, page, self.tokenizer)
            return await session_endpoints.send_html(send, status, html)
        if path.startswith(session_endpoints.PREFIX):
            try:
                sid = turn_requests.check_session_id(path[len(session_endpoints.PREFIX):])
            except SessionError as e:
                return await send_json(send, e.status, session_endpoints.error(e.status, str(e)))
            status, payload = await session_endpoints.handle(
                service, scope.get("method"), tenant, sid, self.tokenizer,
                settings.current.kv_bytes_per_token)
            return await send_json(send, status, payload)
        body = await _read_body(receive)
        try:
            data = turn_requests.parse_body(body)
        except SessionError as e:
            return await send_json(send, e.status, session_endpoints.error(e.status, str(e)))
        if not isinstance(data, dict):
            return await self.app(scope, replay(body, receive), stock_send)
        try:
            sid = turn_requests.session_id_of(data, _header(scope, SESSION_HEADER))
            if sid is None:
                for key in turn_requests.SESSION_FIELDS:
                    if key in data:
                        raise SessionError(400, f"{key} needs a session (session_id or X-Session-ID)")
                return await self.app(scope, replay(body, receive), stock_send)
            parse = turn_requests.chat_request if path == CHAT_PATH else turn_requests.completion_request
            with self.metrics.meter() as meter:  # counts the turn by how it ends
                req, asked = parse(data, tenant, sid, settings.current.policy,
                                   settings.current.budget_limit())
                req.context = ClientContext(scope, receive)
                async with service.turn(req) as turn:
                    meter.turn = turn
                    if req.stream:
                        await self._stream(turn, asked, send)
                    else:
                        await self._complete(turn, asked, send)
        except SessionError as e:
            await send_json(send, e.status, session_endpoints.error(e.status, str(e)))
        except EngineError as e:
            await send({"type": "http.response.start", "status": e.status, "headers": e.headers})
            await send({"type": "http.response.body", "body": e.body})

    async def _complete(self, turn, asked, send) -> None:
        out = await turn.complete()
        if turn.req.api == CHAT:
            payload = chat_response(out, asked, turn.session, turn.text)
        else:
            payload = completion_response(out, asked, turn.kept, turn.session,
                                          prefill=turn.max_tokens == 0)
        await send_json(send, 200, payload, {RETAINED_HEADER: turn.session["retained_tokens"]})

    async def _stream(self, turn, asked, send) -> None:
        """SSE as vLLM streams it; the `session` object rides on the last chunk.
        An engine error before the first chunk is a JSON error (as stock vLLM's)."""
        fmt = ChatStream(asked) if turn.req.api == CHAT else CompletionStream(asked)
        pieces = turn.stream()
        started = False
        try:
            async for chunk, final in pieces:
                if not started:
                    started = True
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (RETAINED_HEADER.encode(), str(turn.kept).encode())]})
                out = fmt.chunks(chunk) if turn.req.api == CHAT else [fmt.chunk(chunk)]
                if final:
                    out[-1]["session"] = turn.session
                for piece in out:
                    await send({"type": "http.response.body", "body": sse(piece), "more_body": True})
        except EngineStreamError as e:
            if not started:
                raise EngineError(500, json.dumps(e.chunk).encode(),
                                  [(b"content-type", b"application/json")]) from None
            await send({"type": "http.response.body", "body": sse(e.chunk), "more_body": True})
        except EngineError as e:
            if not started:
                raise
            # the engine stream broke off (the client left: vLLM aborted it); nothing was committed
            await send({"type": "http.response.body", "more_body": True,
                        "body": sse({"error": {"message": e.body.decode(errors="replace"),
                                               "code": e.status}})})
        finally:
            await pieces.aclose()
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": DONE, "more_body": False})
