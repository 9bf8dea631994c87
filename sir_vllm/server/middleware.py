"""The session layer of the API server: an ASGI middleware (`vllm serve --middleware`).

Requests without a session id pass through untouched (stock vLLM). A request
with one (`session_id` body field or `X-Session-ID` header) on
`/v1/completions` or `/v1/chat/completions` becomes a turn of that session:
the prompt is rebuilt as `kept ids + pending token + new ids`, the connector
is told which cached tokens to keep (`kv_transfer_params`), and the answer's
scores are read back from `prompt_logprobs`/`logprobs` before the response is
trimmed to what the client asked for. Streaming and n > 1 are refused for
sessions (HTTP 400); a session started on one of the two APIs stays on it.

Chat sessions (`/v1/chat/completions`). The session remembers the messages it
has consumed, its own answers included (as the `message.content` it returned).
A request may carry the whole history (the known part is skipped) or only the
new messages (a list with no assistant message); anything else contradicts
the history and gets HTTP 400 (rules: `sir_vllm.sessions.chat`). A turn
renders, with the model's own chat template (`sir_vllm.chat.ChatRenderer`,
the same token stream the oracle and `sir-vllm replay` build):

    first turn   render(messages, add_generation_prompt=True)
                 (SmolLM2's template adds its default system message here only)
    later turns  closing text of the previous answer (the end-of-message text
                 it did not generate: "\n" after a sampled <|im_end|>,
                 "<|im_end|>\n" after a max_tokens cut) + the template text of
                 each new message + the generation prompt

and is then served as a completions turn on those ids; the response is an
OpenAI `chat.completion` (`message.content`: the answer decoded without
special tokens; logprobs in the chat format when `logprobs: true`). Without
`max_tokens`/`max_completion_tokens` a chat turn reserves a quarter of the
session budget, at most 256 tokens (every reserved token is evicted from the
session's memory first). Tools, custom chat templates and
`continue_final_message` are refused in a session.

Scoring fields (completions sessions only; a 400 elsewhere): `max_tokens: 0`
is a prefill (the engine samples one token, which is dropped: the session keeps
exactly the prompt, no pending token; text ""); `session_peek: true` runs the
turn on the session's current state and returns its logprobs without changing
the session (the engine pins nothing and keeps the old pins; the peek's blocks
get a salt of their own, so no later turn reads them as prefix hits, whose
prompt-logprob rows would be missing); `session_reserve_tokens: N` plans the
eviction as if N tokens came (at least the turn's new tokens + max_tokens).

Every session response reports the session in a `session` object (`turns`,
`retained_tokens`, `loaded_tokens`, `recomputed_tokens`, `evicted_tokens`,
`budget`) and in the `X-Session-Retained-Tokens` header.

KV pool pressure: the engine drops the pinned KV of the least recently used
idle sessions when a request does not fit the free blocks (a warning names
the session key). Such a session is not lost: its next turn recomputes its
kept tokens from their ids (`recomputed_tokens` > 0, `loaded_tokens` 0, a
warning in this process) and goes on; never another session's KV.
"""

from __future__ import annotations

import json
import logging
import uuid
from functools import cached_property

from sir_vllm.connector.protocol import PARAMS_KEY, PEEK_KEY, RECOMPUTED_KEY, REPLY_KEY
from sir_vllm.policy import make_policy
from sir_vllm.server import settings
from sir_vllm.sessions import (ChatError, SessionStore, TurnError, commit_turn, new_messages,
                               normalize_messages, plan_turn)
from sir_vllm.sessions.store import tenant_of

logger = logging.getLogger("vllm.sir_vllm.sessions")

COMPLETIONS = "/v1/completions"
SESSIONS = "/v1/sessions/"
CHAT = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
CHAT_MAX_TOKENS_CAP = 256  # a chat turn's default reservation: budget // 4, at most this
# Chat request fields a completions request does not take (handled or refused here).
CHAT_ONLY = frozenset({
    "messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
    "continue_final_message", "chat_template", "chat_template_kwargs", "tools", "tool_choice",
    "parallel_tool_calls", "documents", "include_reasoning", "reasoning_effort",
    "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text", "logprobs"})
SESSION_FIELDS = ("session_peek", "session_reserve_tokens")  # ours; never forwarded to vLLM


class _Upstream(Exception):
    """vLLM answered a session turn with an error: forward it as is."""

    def __init__(self, status: int, headers: list, raw: bytes):
        super().__init__(status)
        self.status, self.headers, self.raw = status, headers, raw


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

    @cached_property
    def renderer(self):
        from sir_vllm.chat import ChatRenderer

        return ChatRenderer(self.tokenizer)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith(SESSIONS):
            return await self._session_endpoint(scope, receive, send)
        path = scope.get("path")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in (COMPLETIONS, CHAT):
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
                for key in SESSION_FIELDS:
                    if key in data:
                        raise HTTPError(400, f"{key} needs a session (session_id or X-Session-ID)")
                return await self.app(scope, _replay(body, receive), send)
            await self._turn(scope, receive, send, data, str(sid), "chat" if path == CHAT else "completions")
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
            "id": session.id, "api": session.api, "turns": session.turns,
            "retained_tokens": len(session.token_ids),
            "retained_bytes": (None if settings.current.kv_bytes_per_token is None
                               else len(session.token_ids) * settings.current.kv_bytes_per_token),
            "evicted_tokens": session.evicted_total, "budget": session.policy.cache_size,
            "policy": session.policy.to_dict(), "pending_token": session.pending,
            "messages": session.messages,
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

    async def _turn(self, scope, receive, send, data: dict, sid: str, api: str) -> None:
        for key, bad in (("stream", True), ("echo", True)):
            if data.get(key) is bad:
                raise HTTPError(400, f"{key}=true is not supported with session_id yet")
        if (data.get("n") or 1) != 1 or (data.get("best_of") or 1) != 1:
            raise HTTPError(400, "n and best_of must be 1 with session_id")
        if api == "chat":
            self._check_chat_fields(data)
        peek, reserve = self._session_fields(data)
        policy, explicit = self._policy_for(data)
        tenant = tenant_of(_api_key(scope))
        session, created = self.store.get_or_create(tenant, sid, policy)
        if explicit and not created and policy.to_dict() != session.policy.to_dict():
            raise HTTPError(400, f"kv_policy: session {sid!r} already runs {session.policy!r}")
        if session.api is not None and session.api != api:
            where = CHAT if session.api == "chat" else COMPLETIONS
            raise HTTPError(400, f"session {sid!r} was started on {where}; continue it there")
        if session.lock.locked():
            raise HTTPError(409, f"session {sid!r} has a request in progress")
        async with session.lock:
            try:
                if api == "chat":
                    status, out, headers = await self._chat_turn(scope, receive, data, session)
                else:
                    status, out, headers = await self._completion_turn(scope, receive, data, session,
                                                                       peek, reserve)
                await _send_json(send, status, out, headers)
            except _Upstream as e:
                await self._forward(send, e.status, e.headers, e.raw)
            finally:
                if created and session.turns == 0:
                    self.store.drop(tenant, sid)  # a failed first turn leaves nothing behind

    @staticmethod
    def _max_tokens(value, name: str = "max_tokens") -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise HTTPError(400, f"{name} must be an integer")
        return value

    @staticmethod
    def _session_fields(data: dict) -> tuple[bool, int | None]:
        """Pop and check `session_peek` and `session_reserve_tokens`."""
        peek = data.pop("session_peek", None)
        reserve = data.pop("session_reserve_tokens", None)
        if peek is not None and not isinstance(peek, bool):
            raise HTTPError(400, "session_peek must be true or false")
        if reserve is not None and (not isinstance(reserve, int) or isinstance(reserve, bool)
                                    or reserve < 0):
            raise HTTPError(400, "session_reserve_tokens must be an integer >= 0")
        return bool(peek), reserve

    async def _completion_turn(self, scope, receive, data: dict, session, peek: bool = False,
                               reserve: int | None = None):
        max_tokens = data.get("max_tokens")
        max_tokens = self._max_tokens(DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)
        new_ids = self._new_ids(data, session.turns == 0)
        out = await self._run_turn(scope, receive, data, session, new_ids, max_tokens, "completions",
                                   peek, reserve)
        return 200, out, {"x-session-retained-tokens": out["session"]["retained_tokens"]}

    async def _run_turn(self, scope, receive, data: dict, session, new_ids: list[int],
                        max_tokens: int, api: str, peek: bool = False,
                        reserve: int | None = None) -> dict:
        """One turn on the engine (a completions request); commits it (unless a
        peek) and returns vLLM's completions response, trimmed, with the
        `session` object. max_tokens 0: a prefill (the sampled token is dropped)."""
        try:
            plan = plan_turn(session, new_ids, max_tokens, reserve)
        except TurnError as e:
            raise HTTPError(400, str(e)) from None

        asked = {k: data.get(k) for k in ("logprobs", "prompt_logprobs", "return_token_ids")}
        params = dict(plan.kv_transfer_params)
        salt = session.cache_salt
        if peek:
            params[PARAMS_KEY] = {**params[PARAMS_KEY], PEEK_KEY: True}
            salt = f"{salt}-peek-{uuid.uuid4().hex}"  # its blocks never serve a later turn
        req = dict(data)
        req.update(prompt=plan.prompt_ids, max_tokens=max(1, max_tokens), cache_salt=salt,
                   return_token_ids=True,
                   kv_transfer_params={**(data.get("kv_transfer_params") or {}), **params})
        if session.policy.needs_scores and not peek:
            req["logprobs"] = asked["logprobs"] or 0
            req["prompt_logprobs"] = asked["prompt_logprobs"] or 0
        status, headers, raw = await self._call(scope, receive, req, path=COMPLETIONS)
        if status != 200:
            raise _Upstream(status, headers, raw)
        out = json.loads(raw)
        choice = out["choices"][0]
        if max_tokens == 0:
            self._drop_answer(out, choice)
        reply = out.get("kv_transfer_params") or {}
        recomputed = min(int(reply.get(RECOMPUTED_KEY) or 0), plan.kept)
        if peek:
            self._trim(out, choice, asked, plan.kept)
            out["session"] = {
                "id": session.id, "turns": session.turns, "retained_tokens": len(session.token_ids),
                "loaded_tokens": plan.kept - recomputed, "recomputed_tokens": recomputed,
                "evicted_tokens": session.evicted_total, "budget": session.policy.cache_size,
                "peek": True}
            return out
        lp = choice.get("logprobs") or {}
        commit_turn(session, plan, choice["token_ids"], choice.get("prompt_logprobs"),
                    lp.get("token_logprobs"), prefill_only=max_tokens == 0)
        session.api = api
        engine = reply.get(REPLY_KEY)
        if engine != len(session.token_ids):
            logger.warning("sir-vllm: session %s: engine pinned %s tokens, expected %d; "
                           "the next turn recomputes", session.id, engine, len(session.token_ids))
        if recomputed:
            logger.warning("sir-vllm: session %s: the engine no longer held its pinned KV (dropped "
                           "from a full KV pool); recomputed its %d kept tokens from their ids",
                           session.id, recomputed)
        self._trim(out, choice, asked, plan.kept)
        out["session"] = {
            "id": session.id, "turns": session.turns, "retained_tokens": len(session.token_ids),
            "loaded_tokens": plan.kept - recomputed, "recomputed_tokens": recomputed,
            "evicted_tokens": session.evicted_total, "budget": session.policy.cache_size}
        return out

    # -- one chat turn ----------------------------------------------------
    @staticmethod
    def _check_chat_fields(data: dict) -> None:
        for key in SESSION_FIELDS:
            if key in data:
                raise HTTPError(400, f"{key} is supported in /v1/completions sessions only")
        if data.get("tools") or data.get("tool_choice") not in (None, "none", "auto"):
            raise HTTPError(400, "tools are not supported in a chat session")
        for key in ("chat_template", "chat_template_kwargs", "documents"):
            if data.get(key):
                raise HTTPError(400, f"{key}: a chat session renders with the model's own chat template")
        if data.get("add_generation_prompt") is False or data.get("continue_final_message"):
            raise HTTPError(400, "add_generation_prompt=false and continue_final_message are not "
                                 "supported in a chat session")

    @staticmethod
    def _chat_default_max_tokens(session, num_new: int) -> int:
        """budget // 4 (at most CHAT_MAX_TOKENS_CAP), or less when a later turn
        leaves less room (a first turn is not bounded by the budget: turn.py)."""
        policy = session.policy
        budget = policy.cache_size
        cap = min(CHAT_MAX_TOKENS_CAP, max(1, budget // 4))
        if session.turns == 0:
            return cap
        return max(1, min(cap, budget - policy.start_size - num_new))

    async def _chat_turn(self, scope, receive, data: dict, session):
        try:
            messages = normalize_messages(data.get("messages"))
            new = new_messages(session.messages, messages, session.id)
            renderer = self.renderer
            new_ids = renderer.messages_ids(new, None if session.turns == 0 else (session.answer_ids or []))
        except ChatError as e:
            raise HTTPError(400, str(e)) from None
        except Exception as e:  # the template refuses the messages (jinja errors, prefix checks)
            raise HTTPError(400, f"messages: the chat template cannot render them: {e}") from None
        max_tokens = data.get("max_completion_tokens")
        name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, name = data.get("max_tokens"), "max_tokens"
        if max_tokens is None:
            max_tokens = self._chat_default_max_tokens(session, len(new_ids))
        max_tokens = self._max_tokens(max_tokens, name)
        if max_tokens < 1:
            raise HTTPError(400, f"{name} must be >= 1 in a chat session (a prefill, max_tokens 0, "
                                 f"is for /v1/completions sessions)")
        top = data.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 0):
            raise HTTPError(400, "top_logprobs must be a non-negative integer")
        req = {k: v for k, v in data.items() if k not in CHAT_ONLY}
        if data.get("logprobs"):
            req["logprobs"] = top or 0
        out = await self._run_turn(scope, receive, req, session, new_ids, max_tokens, "chat")
        choice = out["choices"][0]
        content = choice.get("text") or ""
        session.messages = [*session.messages, *new, {"role": "assistant", "content": content}]
        chat = self._chat_response(out, choice, content, bool(data.get("logprobs")), top or 0,
                                   bool(data.get("return_token_ids")))
        return 200, chat, {"x-session-retained-tokens": out["session"]["retained_tokens"]}

    @staticmethod
    def _chat_response(out: dict, choice: dict, content: str, logprobs: bool, top: int,
                       token_ids: bool) -> dict:
        """vLLM's completions response as an OpenAI `chat.completion`."""
        chat_lp = None
        if logprobs and choice.get("logprobs"):
            lp = choice["logprobs"]
            tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
            chat_lp = {"content": [
                {"token": tok, "logprob": val, "bytes": list(tok.encode("utf-8")),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                  for t, v in sorted((alts or {}).items(), key=lambda kv: -kv[1])[:top]]}
                for tok, val, alts in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops)],
                "refusal": None}
        cid = str(out.get("id", ""))
        result = {
            "id": "chatcmpl-" + (cid[5:] if cid.startswith("cmpl-") else cid),
            "object": "chat.completion", "created": out.get("created"), "model": out.get("model"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None,
                            "annotations": None, "audio": None, "function_call": None,
                            "tool_calls": []},
                "logprobs": chat_lp, "finish_reason": choice.get("finish_reason"),
                "stop_reason": choice.get("stop_reason")}],
            "service_tier": None, "system_fingerprint": None, "usage": out.get("usage"),
            "session": out["session"],
        }
        if choice.get("prompt_logprobs") is not None:
            result["prompt_logprobs"] = choice["prompt_logprobs"]
        if token_ids:
            result["choices"][0]["token_ids"] = choice.get("token_ids")
            result["prompt_token_ids"] = choice.get("prompt_token_ids")
        return result

    @staticmethod
    def _drop_answer(out: dict, choice: dict) -> None:
        """A prefill (max_tokens 0): drop the one token the engine had to sample."""
        choice.update(text="", token_ids=[], finish_reason="length", stop_reason=None)
        if choice.get("logprobs"):
            choice["logprobs"] = {"text_offset": [], "token_logprobs": [], "tokens": [],
                                  "top_logprobs": []}
        usage = out.get("usage")
        if usage:
            usage["completion_tokens"] = 0
            usage["total_tokens"] = usage.get("prompt_tokens")

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
