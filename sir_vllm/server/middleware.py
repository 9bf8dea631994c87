"""The session layer of the API server: an ASGI middleware (`vllm serve --middleware`).

Requests without a session id pass through untouched (stock vLLM). A
completions request with one becomes a turn of that session: the prompt is
rebuilt as `kept ids + pending token + new ids`, the connector is told which
cached tokens to keep (`kv_transfer_params`), and the answer's scores are read
back from `prompt_logprobs`/`logprobs` before the response is trimmed to what
the client asked for. Streaming and n > 1 are refused for sessions (v1).

The response reports the session in a `session` object and in the
`X-Session-Retained-Tokens` header.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property

from sir_vllm.connector.protocol import PARAMS_KEY, REPLY_KEY
from sir_vllm.policy import make_policy
from sir_vllm.server import settings
from sir_vllm.sessions import SessionStore, TurnError, commit_turn, plan_turn
from sir_vllm.sessions.store import tenant_of

logger = logging.getLogger("vllm.sir_vllm.sessions")

COMPLETIONS = "/v1/completions"
SESSIONS = "/v1/sessions/"
CHAT = "/v1/chat/completions"  # session-aware chat: not in this slice (refused, never silently stock)
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """Hand `body` to the app once, then wait on the real client (vLLM listens
    for its disconnect to abort the request)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


async def _send_json(send, status: int, payload: dict, headers: dict | None = None) -> None:
    body = json.dumps(payload).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}.get(status, "Error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _api_key(scope) -> str | None:
    auth = _header(scope, b"authorization") or ""
    return auth[7:] if auth.lower().startswith("bearer ") else None


class SessionMiddleware:
    store = SessionStore()  # one per API process (see flags.check_serving)

    def __init__(self, app):
        self.app = app

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(settings.current.tokenizer)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith(SESSIONS):
            return await self._session_endpoint(scope, receive, send)
        if (scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") == CHAT
                and _header(scope, b"x-session-id")):
            return await _send_json(send, 400, _error(400, "sessions run on /v1/completions for now"))
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != COMPLETIONS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            data = json.loads(body)
            assert isinstance(data, dict)
        except (ValueError, AssertionError):
            return await self.app(scope, _replay(body, receive), send)
        try:
            if PARAMS_KEY in (data.get("kv_transfer_params") or {}):
                raise HTTPError(400, f"kv_transfer_params.{PARAMS_KEY} is reserved for the server")
            sid = data.get("session_id") or _header(scope, b"x-session-id")
            if not sid:
                return await self.app(scope, _replay(body, receive), send)
            await self._turn(scope, receive, send, data, str(sid))
        except HTTPError as e:
            await _send_json(send, e.status, _error(e.status, str(e)))

    # -- GET / DELETE /v1/sessions/{id} ------------------------------------
    async def _session_endpoint(self, scope, receive, send) -> None:
        if not self._authorized(scope):
            return await _send_json(send, 401, {"error": "Unauthorized"})
        sid = scope["path"][len(SESSIONS):]
        tenant = tenant_of(_api_key(scope))
        session = self.store.get(tenant, sid)
        method = scope.get("method")
        if method not in ("GET", "DELETE"):
            return await _send_json(send, 405, _error(405, "use GET or DELETE"))
        if session is None:
            return await _send_json(send, 404, _error(404, f"no session {sid!r}"))
        if method == "GET":
            return await _send_json(send, 200, self._describe(session))
        if session.lock.locked():
            return await _send_json(send, 409, _error(409, f"session {sid!r} has a request in progress"))
        self.store.drop(tenant, sid)
        await self._call(scope, receive, {  # free the engine's pinned blocks
            "prompt": [session.pending if session.pending is not None else 0], "max_tokens": 1,
            "kv_transfer_params": {PARAMS_KEY: {"id": session.key, "drop": True}}},
            path=COMPLETIONS)
        await _send_json(send, 200, {"id": sid, "deleted": True})

    @staticmethod
    def _authorized(scope) -> bool:
        keys = settings.current.api_keys
        return not keys or _api_key(scope) in keys

    def _describe(self, session) -> dict:
        scores = session.scores.scores
        return {
            "id": session.id, "turns": session.turns, "retained_tokens": len(session.token_ids),
            "evicted_tokens": session.evicted_total, "budget": session.policy.cache_size,
            "policy": session.policy.to_dict(), "pending_token": session.pending,
            "tokens": [{"id": t, "text": self.tokenizer.decode([t]), "score": float(sc)}
                       for t, sc in zip(session.token_ids, scores)],
        }

    # -- one session turn -------------------------------------------------
    def _policy_for(self, data: dict):
        knobs = data.pop("kv_policy", None)
        if knobs is None:
            return settings.current.policy, False
        if not isinstance(knobs, dict):
            raise HTTPError(400, "kv_policy must be an object like {\"name\": \"sirllm\", \"entropy_size\": 64}")
        knobs = dict(knobs)
        name = knobs.pop("name", settings.current.policy.name)
        if name in ("none", "full"):
            raise HTTPError(400, "kv_policy.name: a session needs a bounded policy (sirllm or streaming)")
        try:
            policy = make_policy(name, **knobs)
        except (TypeError, ValueError) as e:
            raise HTTPError(400, f"kv_policy: {e}") from None
        if policy.needs_scores and policy.score != "paper":
            raise HTTPError(400, "kv_policy.score: only 'paper' is supported by the server")
        return policy, True

    def _new_ids(self, data: dict, first_turn: bool) -> list[int]:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            add_special = bool(data.get("add_special_tokens", True)) and first_turn
            return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise HTTPError(400, "a session turn takes one prompt: a string or a list of token ids")

    async def _turn(self, scope, receive, send, data: dict, sid: str) -> None:
        for key, bad in (("stream", True), ("echo", True)):
            if data.get(key) is bad:
                raise HTTPError(400, f"{key}=true is not supported with session_id yet")
        if (data.get("n") or 1) != 1 or (data.get("best_of") or 1) != 1:
            raise HTTPError(400, "n and best_of must be 1 with session_id")
        policy, explicit = self._policy_for(data)
        tenant = tenant_of(_api_key(scope))
        session, created = self.store.get_or_create(tenant, sid, policy)
        if explicit and not created and policy.to_dict() != session.policy.to_dict():
            raise HTTPError(400, f"kv_policy: session {sid!r} already runs {session.policy!r}")
        if session.lock.locked():
            raise HTTPError(409, f"session {sid!r} has a request in progress")
        async with session.lock:
            try:
                await self._run_turn(scope, receive, send, data, session)
            finally:
                if created and session.turns == 0:
                    self.store.drop(tenant, sid)  # a failed first turn leaves nothing behind

    async def _run_turn(self, scope, receive, send, data: dict, session) -> None:
        max_tokens = data.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise HTTPError(400, "max_tokens must be an integer")
        new_ids = self._new_ids(data, session.turns == 0)
        try:
            plan = plan_turn(session, new_ids, max_tokens)
        except TurnError as e:
            raise HTTPError(400, str(e)) from None

        asked = {k: data.get(k) for k in ("logprobs", "prompt_logprobs", "return_token_ids")}
        req = dict(data)
        req.update(prompt=plan.prompt_ids, max_tokens=max_tokens, cache_salt=session.cache_salt,
                   return_token_ids=True,
                   kv_transfer_params={**(data.get("kv_transfer_params") or {}), **plan.kv_transfer_params})
        if session.policy.needs_scores:
            req["logprobs"] = asked["logprobs"] or 0
            req["prompt_logprobs"] = asked["prompt_logprobs"] or 0
        status, headers, raw = await self._call(scope, receive, req)
        if status != 200:
            return await self._forward(send, status, headers, raw)
        out = json.loads(raw)
        choice = out["choices"][0]
        lp = choice.get("logprobs") or {}
        commit_turn(session, plan, choice["token_ids"], choice.get("prompt_logprobs"),
                    lp.get("token_logprobs"))
        engine = (out.get("kv_transfer_params") or {}).get(REPLY_KEY)
        if engine != len(session.token_ids):
            logger.warning("sir-vllm: session %s: engine pinned %s tokens, expected %d; "
                           "the next turn recomputes", session.id, engine, len(session.token_ids))
        self._trim(out, choice, asked, plan.kept)
        info = {"id": session.id, "turns": session.turns, "retained_tokens": len(session.token_ids),
                "loaded_tokens": plan.kept, "evicted_tokens": session.evicted_total,
                "budget": session.policy.cache_size}
        out["session"] = info
        await _send_json(send, 200, out, {"x-session-retained-tokens": info["retained_tokens"]})

    @staticmethod
    def _trim(out: dict, choice: dict, asked: dict, kept: int) -> None:
        """Give the client only what it asked for; loaded rows of prompt logprobs are None."""
        out.pop("kv_transfer_params", None)
        if not asked["return_token_ids"]:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if asked["logprobs"] is None:
            choice["logprobs"] = None
        if asked["prompt_logprobs"] is None:
            choice["prompt_logprobs"] = None
        elif choice.get("prompt_logprobs"):
            for j in range(min(kept + 1, len(choice["prompt_logprobs"]))):
                choice["prompt_logprobs"][j] = None

    async def _call(self, scope, receive, req: dict, path: str | None = None) -> tuple[int, list, bytes]:
        body = json.dumps(req).encode()
        headers = [(k, v) for k, v in scope.get("headers", [])
                   if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        inner = {**scope, "headers": headers}
        if path is not None:
            inner.update(method="POST", path=path, raw_path=path.encode())
        result = {"status": 500, "headers": [], "body": []}

        async def capture(msg):
            if msg["type"] == "http.response.start":
                result["status"], result["headers"] = msg["status"], msg.get("headers", [])
            elif msg["type"] == "http.response.body":
                result["body"].append(msg.get("body", b""))

        await self.app(inner, _replay(body, receive), capture)
        return result["status"], result["headers"], b"".join(result["body"])

    @staticmethod
    async def _forward(send, status, headers, raw) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
