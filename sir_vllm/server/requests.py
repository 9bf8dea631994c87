"""A session request's body, checked: what the client asked, as a `TurnRequest`.

Every refusal is a `SessionError(400, reason)`; fields the session layer does
not handle pass on to vLLM's completions request untouched (sampling, stop,
seed, structured output, ...), where vLLM validates them as for any request.
"""

from __future__ import annotations

import json
import re

from sir_vllm.connector.protocol import PARAMS_KEY
from sir_vllm.server.flags import policy_from_request
from sir_vllm.server.openai_format import Asked
from sir_vllm.sessions.history import ChatError, normalize_messages
from sir_vllm.sessions.service import CHAT, COMPLETIONS, SessionError, TurnRequest

SESSION_FIELDS = ("session_peek", "session_reserve_tokens")  # ours; never forwarded to vLLM
MAX_SESSION_ID = 256
SESSION_ID = re.compile(r"^[\w.:@/+=~-]{1,%d}$" % MAX_SESSION_ID)
# Chat request fields a completions request does not take (handled or refused here).
CHAT_ONLY = frozenset({
    "messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
    "continue_final_message", "chat_template", "chat_template_kwargs", "tools", "tool_choice",
    "parallel_tool_calls", "documents", "include_reasoning", "reasoning_effort",
    "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text", "logprobs"})


def parse_body(body: bytes) -> dict | list | str | int | float | None:
    """The request body as JSON, None when it is not JSON at all (vLLM answers
    that as for any request); JSON nested deeper than the parser recurses is
    a 400 here, for every request (vLLM's own parse would fail the same way,
    as a 500)."""
    try:
        return json.loads(body)
    except ValueError:
        return None
    except RecursionError:
        raise SessionError(400, "request body: JSON nested too deeply") from None


def check_session_id(value) -> str:
    if not isinstance(value, str):
        raise SessionError(400, f"session id must be a string, got {type(value).__name__}")
    sid = value
    if len(sid) > MAX_SESSION_ID:
        raise SessionError(400, f"session id: at most {MAX_SESSION_ID} characters, got {len(sid)}")
    if not SESSION_ID.fullmatch(sid):
        raise SessionError(400, "session id: letters, digits and . : @ / + = ~ - _ only "
                                f"(1 to {MAX_SESSION_ID} characters)")
    return sid


def session_id_of(data: dict, header: str | None) -> str | None:
    """The request's session id (body field first, then the X-Session-ID header), or None."""
    sid = data.get("session_id")
    if sid is None or sid == "":
        sid = header
    return None if sid is None or sid == "" else check_session_id(sid)


def _unicode(text: str, name: str) -> str:
    """`text`, if it is Unicode a tokenizer can take (JSON lets a lone surrogate through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SessionError(400, f"{name}: not valid Unicode (a lone surrogate at character "
                                f"{e.start})") from None
    return text


def _int(value, name: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SessionError(400, f"{name} must be an integer")
    if minimum is not None and value < minimum:
        raise SessionError(400, f"{name} must be >= {minimum}")
    return value


def _policy(data: dict, default, max_budget):
    """The per-request policy (`kv_policy`), or None when the request names none."""
    value = data.pop("kv_policy", None)
    if value is None:
        return None
    try:
        return policy_from_request(value, default, max_budget)
    except ValueError as e:
        raise SessionError(400, str(e)) from None


def _common(data: dict, default_policy, max_budget) -> tuple[dict, object]:
    """Checks both APIs share; returns (the rest of the body, the per-request policy)."""
    data = dict(data)
    params = data.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise SessionError(400, "kv_transfer_params must be an object")
    if PARAMS_KEY in (params or {}):
        raise SessionError(400, f"kv_transfer_params.{PARAMS_KEY} is reserved for the server")
    if data.get("echo") not in (None, False):
        raise SessionError(400, "echo=true is not supported with session_id")
    if (data.get("n") or 1) != 1 or (data.get("best_of") or 1) != 1:
        raise SessionError(400, "n and best_of must be 1 with session_id (a session has one "
                                "continuation)")
    if not isinstance(data.get("stream", False), bool) and data.get("stream") is not None:
        raise SessionError(400, "stream must be true or false")
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise SessionError(400, "stream_options must be an object")
        if not data.get("stream"):  # as vLLM refuses it
            raise SessionError(400, "stream_options can only be defined when stream=true")
        for key, value in options.items():
            if not isinstance(value, bool) and value is not None:
                raise SessionError(400, f"stream_options.{key} must be true or false")
    return data, _policy(data, default_policy, max_budget)


def completion_request(data: dict, tenant: str, sid: str, default_policy,
                       max_budget: int | None = None) -> tuple[TurnRequest, Asked]:
    data, policy = _common(data, default_policy, max_budget)
    peek = data.pop("session_peek", None)
    reserve = data.pop("session_reserve_tokens", None)
    if peek is not None and not isinstance(peek, bool):
        raise SessionError(400, "session_peek must be true or false")
    if reserve is not None:
        reserve = _int(reserve, "session_reserve_tokens", 0)
    max_tokens = data.pop("max_tokens", None)
    if max_tokens is not None:
        max_tokens = _int(max_tokens, "max_tokens", 0)
    stream = bool(data.pop("stream", False))
    if stream and (peek or max_tokens == 0):
        raise SessionError(400, "stream=true with session_peek or max_tokens 0 (a scoring turn) "
                                "is not supported: ask without stream")
    prompt = data.pop("prompt", None)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
        raise SessionError(400, "a session turn takes one prompt: a string or a list of token ids")
    if isinstance(prompt, str):
        _unicode(prompt, "prompt")
    for key in ("logprobs", "prompt_logprobs"):  # the session layer reads them (vLLM checks the range)
        if data.get(key) is not None and not isinstance(data[key], int):
            raise SessionError(400, f"{key} must be an integer")
    add_special = data.pop("add_special_tokens", True)
    asked = Asked(logprobs=data.get("logprobs"), prompt_logprobs=data.get("prompt_logprobs"),
                  return_token_ids=bool(data.get("return_token_ids")))
    req = TurnRequest(api=COMPLETIONS, tenant=tenant, session_id=sid, engine_body=data,
                      stream=stream, prompt=prompt, add_special_tokens=bool(add_special),
                      max_tokens=max_tokens, policy=policy, peek=bool(peek), reserve=reserve)
    return req, asked


def chat_request(data: dict, tenant: str, sid: str, default_policy,
                 max_budget: int | None = None) -> tuple[TurnRequest, Asked]:
    data, policy = _common(data, default_policy, max_budget)
    for key in SESSION_FIELDS:
        if key in data:
            raise SessionError(400, f"{key} is supported in /v1/completions sessions only")
    if data.get("tools") or data.get("tool_choice") not in (None, "none", "auto"):
        raise SessionError(400, "tools are not supported in a chat session")
    for key in ("chat_template", "chat_template_kwargs", "documents"):
        if data.get(key):
            raise SessionError(400, f"{key}: a chat session renders with the server's chat template")
    if data.get("add_generation_prompt") is False or data.get("continue_final_message"):
        raise SessionError(400, "add_generation_prompt=false and continue_final_message are not "
                                "supported in a chat session")
    try:
        messages = normalize_messages(data.get("messages"))
    except ChatError as e:
        raise SessionError(400, str(e)) from None
    for i, m in enumerate(messages):
        _unicode(m["content"], f"messages[{i}].content")
    name = "max_completion_tokens"
    max_tokens = data.get(name)
    if max_tokens is None:
        name, max_tokens = "max_tokens", data.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _int(max_tokens, name)
        if max_tokens < 1:
            raise SessionError(400, f"{name} must be >= 1 in a chat session (a prefill, "
                                    "max_tokens 0, is for /v1/completions sessions)")
    top = data.get("top_logprobs")
    if top is not None:
        top = _int(top, "top_logprobs", 0)
    if data.get("logprobs") not in (None, True, False):
        raise SessionError(400, "logprobs must be true or false in a chat request")
    chat_logprobs = bool(data.get("logprobs"))
    if top and not chat_logprobs:  # as vLLM refuses it
        raise SessionError(400, "top_logprobs needs logprobs=true")
    stream = bool(data.get("stream", False))
    body = {k: v for k, v in data.items() if k not in CHAT_ONLY and k not in ("max_tokens", "stream")}
    if chat_logprobs:
        body["logprobs"] = top or 0
    asked = Asked(logprobs=(top or 0) if chat_logprobs else None,
                  prompt_logprobs=data.get("prompt_logprobs"),
                  return_token_ids=bool(data.get("return_token_ids")), chat_logprobs=chat_logprobs)
    req = TurnRequest(api=CHAT, tenant=tenant, session_id=sid, engine_body=body, stream=stream,
                      messages=messages, max_tokens=max_tokens, policy=policy)
    return req, asked
