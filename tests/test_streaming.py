"""Streaming session turns through the real `vllm serve --kv-policy sirllm` (the
shared server, budget 4 + 64 + 32) and the official `openai` client: the
chunks stock vLLM streams, the `session` object on the last chunk, the same
session state as a whole response, and an aborted stream that leaves no trace."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

from conftest import SERVED_NAME

PROMPTS = ["Hi! My name is Ada and I like green tea.", "Can you suggest a name for my cat?",
           "What is my name?"]


def new_sid() -> str:
    return f"stream-{uuid.uuid4().hex[:8]}"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def session_info(server, sid):
    r = httpx.get(f"{server.url}/v1/sessions/{sid}", headers={"Authorization": "Bearer unused"},
                  timeout=60)
    r.raise_for_status()
    return r.json()


def chat_stream(client, messages, sid=None, **extra):
    body = {"return_token_ids": True, **({"session_id": sid} if sid else {})}
    chunks = list(client.chat.completions.create(
        model=SERVED_NAME, messages=messages, temperature=0.0, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, extra_body=body, **extra))
    return [c.model_dump(exclude_unset=True) for c in chunks]


def shape(chunk: dict):
    """A chunk's keys, recursively, without the values that differ between two runs."""
    if isinstance(chunk, dict):
        return {k: shape(v) for k, v in chunk.items()
                if k not in ("id", "created", "session", "prompt_token_ids", "token_ids")}
    if isinstance(chunk, list):
        return [shape(v) for v in chunk]
    return type(chunk).__name__


def kinds(chunks: list[dict]) -> list:
    """The chunks' shapes with repeats in a row folded into one."""
    out = []
    for c in chunks:
        if not out or shape(c) != out[-1]:
            out.append(shape(c))
    return out


def test_a_streamed_chat_turn_is_the_stream_stock_vllm_sends(session_client):
    """A session's first turn renders as stock vLLM's chat does: the same
    chunks (role chunk, content deltas, finish, usage), the same text."""
    stock = chat_stream(session_client, [u(PROMPTS[0])])
    mine = chat_stream(session_client, [u(PROMPTS[0])], sid=new_sid())
    text = lambda cs: "".join(c["choices"][0]["delta"].get("content") or "" for c in cs if c["choices"])
    assert text(mine) == text(stock) and text(mine)
    # vLLM coalesces tokens into fewer chunks when its reader lags: compare the
    # kinds of chunk in order (role, content deltas, finish, usage), not their count
    assert kinds(mine) == kinds(stock) and len(kinds(stock)) == 4
    assert mine[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in mine)
    assert "session" not in stock[-1]
    last = mine[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == stock[-1]["usage"]["completion_tokens"]
    assert last["session"]["turns"] == 1 and last["session"]["retained_tokens"] > 0
    assert all("session" not in c for c in mine[:-1])


def test_streamed_and_whole_turns_leave_the_same_session(session_client, session_server):
    streamed, whole = new_sid(), new_sid()
    history: list[dict] = []
    for text in PROMPTS:
        history.append(u(text))
        got = chat_stream(session_client, history, sid=streamed)
        ref = session_client.chat.completions.create(
            model=SERVED_NAME, messages=history, temperature=0.0, max_tokens=16,
            extra_body={"session_id": whole, "return_token_ids": True}).model_dump()
        ids = [t for c in got if c["choices"] for t in (c["choices"][0].get("token_ids") or [])]
        assert ids == ref["choices"][0]["token_ids"]
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"])
        assert content == ref["choices"][0]["message"]["content"]
        assert got[-1]["session"] == {**ref["session"], "id": streamed}
        history.append(a(content))
    s, w = session_info(session_server, streamed), session_info(session_server, whole)
    assert [t["id"] for t in s["tokens"]] == [t["id"] for t in w["tokens"]]
    assert [t["score"] for t in s["tokens"]] == pytest.approx([t["score"] for t in w["tokens"]], abs=1e-4)
    assert s["evicted_tokens"] > 0, "three turns never evicted: the test does not exercise compaction"


def test_a_streamed_completions_turn_with_logprobs(session_client):
    sid = new_sid()
    session_client.completions.create(model=SERVED_NAME, prompt="Alice keeps a red key.",
                                      max_tokens=8, temperature=0.0, extra_body={"session_id": sid})
    raw = session_client.completions.with_raw_response.create(
        model=SERVED_NAME, prompt=" Where is the key?", max_tokens=8, temperature=0.0, logprobs=1,
        stream=True, extra_body={"session_id": sid, "ignore_eos": True})
    assert int(raw.headers["x-session-retained-tokens"]) > 0  # known at start: the kept tokens
    chunks = [c.model_dump() for c in raw.parse()]
    lps = [lp for c in chunks for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(lps) == 8 and all(lp <= 0 for lp in lps)  # the answer's only: no echoed prompt rows
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert all("token_ids" not in c["choices"][0] or c["choices"][0]["token_ids"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["session"]["turns"] == 2 and chunks[-1]["session"]["loaded_tokens"] > 0


def sse_abort_after(url: str, body: dict, events: int) -> list[dict]:
    """POST a streaming request, read `events` SSE events, then hang up."""
    got = []
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", url, json=body, headers={"Authorization": "Bearer unused"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                    if len(got) >= events:
                        break
    return got


def retry_busy(fn, seconds: float = 30.0):
    """The aborted turn's lease goes when vLLM has aborted its request (a moment)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except openai.ConflictError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_an_aborted_stream_leaves_the_session_as_before(session_client, session_server):
    aborted, clean = new_sid(), new_sid()
    first = [u(PROMPTS[0])]
    for sid in (aborted, clean):
        session_client.chat.completions.create(model=SERVED_NAME, messages=first, temperature=0.0,
                                               max_tokens=16, extra_body={"session_id": sid})
    before = session_info(session_server, aborted)
    got = sse_abort_after(session_server.url + "/v1/chat/completions", {
        "model": SERVED_NAME, "messages": [u("Tell me a long story.")],
        "max_tokens": 60, "temperature": 0.0, "stream": True, "ignore_eos": True,
        "session_id": aborted}, events=3)
    assert len(got) == 3 and all(c["object"] == "chat.completion.chunk" for c in got)

    nxt = lambda sid: retry_busy(lambda: session_client.chat.completions.create(
        model=SERVED_NAME, messages=[u(PROMPTS[1])], temperature=0.0, max_tokens=16,
        extra_body={"session_id": sid, "return_token_ids": True}).model_dump())
    after = session_info(session_server, aborted)
    assert {k: after[k] for k in ("turns", "retained_tokens", "tokens", "evicted_tokens")} == \
        {k: before[k] for k in ("turns", "retained_tokens", "tokens", "evicted_tokens")}
    a_out, c_out = nxt(aborted), nxt(clean)
    assert a_out["choices"][0]["token_ids"] == c_out["choices"][0]["token_ids"]
    assert a_out["prompt_token_ids"] == c_out["prompt_token_ids"]
    assert a_out["session"]["turns"] == 2
    # the engine kept the old pins through the abort: the next turn loaded them
    assert a_out["session"]["recomputed_tokens"] == 0
    assert a_out["session"]["loaded_tokens"] == before["retained_tokens"]
