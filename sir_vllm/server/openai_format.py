"""OpenAI formats of a session turn: responses and stream chunks, as stock vLLM gives them.

A session turn runs on vLLM's completions API with more than the client asked
for (token ids, log-probs for the scores, `echo` when streaming, our
`kv_transfer_params`). What goes back is cut to what the client asked
(`Asked`) and, for chat sessions, turned into `chat.completion` /
`chat.completion.chunk` objects with the fields vLLM's own chat endpoint sets.
Every response carries the `session` object: a whole response as a top-level
field; a stream in its last chunk before `data: [DONE]` (the usage chunk when
`stream_options.include_usage` is set, else the chunk with `finish_reason`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Asked:
    """What the client asked to see (everything else the session layer added is cut)."""

    logprobs: int | None = None  # completions: top-n; chat: top_logprobs when logprobs=true
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    chat_logprobs: bool = False  # chat: `logprobs: true`


def sse(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def _cut_prompt_rows(choice: dict, asked: Asked, kept: int) -> None:
    if asked.prompt_logprobs is None:
        choice["prompt_logprobs"] = None
    elif choice.get("prompt_logprobs"):
        for j in range(min(kept + 1, len(choice["prompt_logprobs"]))):
            choice["prompt_logprobs"][j] = None  # loaded positions: no row of this turn's


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


def completion_response(out: dict, asked: Asked, kept: int, session: dict,
                        prefill: bool = False) -> dict:
    """vLLM's completions response, cut to what the client asked, with `session`."""
    out = copy.deepcopy(out)
    out.pop("kv_transfer_params", None)
    choice = out["choices"][0]
    if prefill:
        _drop_answer(out, choice)
    if not asked.return_token_ids:
        choice.pop("token_ids", None)
        choice.pop("prompt_token_ids", None)
    if asked.logprobs is None:
        choice["logprobs"] = None
    _cut_prompt_rows(choice, asked, kept)
    out["session"] = session
    return out


def _chat_logprobs(lp: dict | None, top: int) -> dict | None:
    """Completions-format log-probs as the chat format's `{"content": [...]}`."""
    if not lp:
        return None
    tokens = lp.get("tokens") or []
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    return {"content": [
        {"token": tok, "logprob": val, "bytes": list(tok.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                          for t, v in sorted((alts or {}).items(), key=lambda kv: -kv[1])[:top]]}
        for tok, val, alts in zip(tokens, lp.get("token_logprobs") or [], tops)]}


def _chat_id(completion_id) -> str:
    cid = str(completion_id or "")
    return "chatcmpl-" + (cid[5:] if cid.startswith("cmpl-") else cid)


def chat_response(out: dict, asked: Asked, session: dict, content: str) -> dict:
    """vLLM's completions response of a chat turn as an OpenAI `chat.completion`."""
    choice = out["choices"][0]
    logprobs = _chat_logprobs(choice.get("logprobs"), asked.logprobs or 0) \
        if asked.chat_logprobs else None
    result = {
        "id": _chat_id(out.get("id")), "object": "chat.completion", "created": out.get("created"),
        "model": out.get("model"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": []},
            "logprobs": logprobs, "finish_reason": choice.get("finish_reason"),
            "stop_reason": choice.get("stop_reason")}],
        "service_tier": None, "system_fingerprint": None, "usage": out.get("usage"),
        "session": session,
    }
    if asked.prompt_logprobs is not None and choice.get("prompt_logprobs") is not None:
        result["prompt_logprobs"] = choice["prompt_logprobs"]
    if asked.return_token_ids:
        result["choices"][0]["token_ids"] = choice.get("token_ids")
        result["prompt_token_ids"] = choice.get("prompt_token_ids")
    return result


class CompletionStream:
    """vLLM's completions chunks of a turn (`echo` already undone by the
    sessions service), cut to what the client asked."""

    def __init__(self, asked: Asked):
        self.asked = asked

    def chunk(self, chunk: dict) -> dict:
        chunk = copy.deepcopy(chunk)
        for choice in chunk.get("choices") or []:
            if not self.asked.return_token_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
            if self.asked.logprobs is None:
                choice["logprobs"] = None
        return chunk


class ChatStream:
    """A chat turn's completions chunks as `chat.completion.chunk` objects.

    The first chunk with the answer's first tokens is preceded by the role
    chunk (`delta: {"role": "assistant", "content": ""}`), as vLLM's chat
    endpoint sends it; the usage chunk has no choices."""

    def __init__(self, asked: Asked):
        self.asked = asked
        self.completions = CompletionStream(asked)
        self.started = False

    def _head(self, chunk: dict) -> dict:
        return {"id": _chat_id(chunk.get("id")), "object": "chat.completion.chunk",
                "created": chunk.get("created"), "model": chunk.get("model")}

    def chunks(self, chunk: dict) -> list[dict]:
        raw = self.completions.chunk(chunk)
        out = []
        if not raw.get("choices"):
            usage = {**self._head(raw), "choices": []}
            for key in ("usage", "metrics", "system_fingerprint"):
                if raw.get(key) is not None:
                    usage[key] = raw[key]
            return [usage]
        choice = raw["choices"][0]
        if not self.started:
            self.started = True
            role = {**self._head(raw), "choices": [{
                "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}]}
            role["prompt_token_ids"] = choice.get("prompt_token_ids") if self.asked.return_token_ids \
                else None
            role["prompt_text"] = None
            out.append(role)
        delta = {"index": 0, "delta": {"content": choice.get("text") or ""},
                 "logprobs": (_chat_logprobs(choice.get("logprobs"), self.asked.logprobs or 0)
                              if self.asked.chat_logprobs else None),
                 "finish_reason": choice.get("finish_reason")}
        if choice.get("finish_reason") is not None:
            delta["stop_reason"] = choice.get("stop_reason")
        delta["token_ids"] = choice.get("token_ids") if self.asked.return_token_ids else None
        body = {**self._head(raw), "choices": [delta]}
        if raw.get("usage") is not None:
            body["usage"] = raw["usage"]  # continuous usage stats
        out.append(body)
        return out
