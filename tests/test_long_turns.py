"""Turns of any length (issue 17) through the real `vllm serve --kv-policy
sirllm` (the shared server: budget 4 + 64 + 32, so a pass takes 24 tokens)
and the official `openai` client: a message and an answer longer than the
budget run in passes, the oracle split the same way agrees token for token,
a long answer is one answer, and an aborted long turn leaves no trace."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import openai
import pytest

from sir_vllm.policy import make_policy
from sir_vllm.replay import ReferenceReplayer, ServerReplayer

from conftest import SERVED_NAME

POLICY = make_policy("sirllm", start_size=4, entropy_size=64, recent_size=32)
LONG_TEXT = " ".join(["The river runs past the old mill and the baker's shop,"] * 40)


def sid() -> str:
    return f"long-{uuid.uuid4().hex[:8]}"


def test_a_message_4x_and_an_answer_3x_the_budget_match_the_oracle(session_server, bundled_model):
    server = ServerReplayer(POLICY, str(bundled_model), session_server.url, SERVED_NAME)
    oracle = ReferenceReplayer(POLICY, str(bundled_model), window=4096)
    turns = [("Hello! Please read what I send next.", 16),
             (LONG_TEXT, 16),                      # ~480 tokens: 4x the budget and more
             ("Now tell me a long story about it.", 300)]  # an answer 3x the budget
    chunks = []
    for i, (user, max_tokens) in enumerate(turns):
        served, out = server.turn(user, max_tokens, ignore_eos=True)
        mine, turn = oracle.turn(user, max_tokens, forced=served.token_ids)
        s = out.model_extra["session"]
        assert served.input_ids == mine.input_ids, f"turn {i}"
        assert len(served.token_ids) == max_tokens
        assert s["chunks"] == turn.chunks and s["segments"] == turn.segments, f"turn {i}"
        chunks.append(s["chunks"])
        assert served.retained == mine.retained <= POLICY.cache_size, f"turn {i}"
        ids = httpx.get(f"{session_server.url}/v1/sessions/{server.session_id}",
                        headers={"Authorization": "Bearer unused"}, timeout=60).json()["tokens"]
        assert [t["id"] for t in ids] == oracle.session.ids, f"turn {i}"
        diff = np.abs(np.array(served.logprobs) - np.array(turn.logprobs))
        assert diff.max() <= 1e-3, (i, diff.max())
    assert chunks[1] >= 480 // 24 - 1  # the long message ran in chunks
    assert s["segments"] == -(-300 // 24) and s["chunks"] == 0  # the last turn's answer


def test_a_long_answer_without_eviction_is_what_one_request_gives(session_client):
    """Segments that never need to evict give the tokens one request gives."""
    s = sid()
    session_client.completions.create(model=SERVED_NAME, prompt=[504, 3458], max_tokens=1,
                                      temperature=0.0, extra_body={"session_id": s})
    out = session_client.completions.create(
        model=SERVED_NAME, prompt=[28], max_tokens=97, temperature=0.0,  # 98 > 96: a long turn
        extra_body={"session_id": s, "return_token_ids": True, "ignore_eos": True}).model_dump()
    assert out["session"]["segments"] == 5 and out["session"]["evicted_tokens"] == 0
    prompt = out["choices"][0]["prompt_token_ids"]
    one = session_client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=97, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True}).model_dump()
    assert out["choices"][0]["token_ids"] == one["choices"][0]["token_ids"]
    assert out["choices"][0]["text"] == one["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 97


def test_a_long_answer_streams_as_one_answer(session_client):
    streamed, whole = sid(), sid()
    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    ref = session_client.chat.completions.create(
        model=SERVED_NAME, messages=msgs, temperature=0.0, max_tokens=20,
        extra_body={"session_id": whole}).model_dump()
    session_client.chat.completions.create(model=SERVED_NAME, messages=msgs, temperature=0.0,
                                           max_tokens=20, extra_body={"session_id": streamed})
    nxt = [*msgs, {"role": "assistant", "content": ref["choices"][0]["message"]["content"]},
           {"role": "user", "content": "Go on, much longer."}]
    want = session_client.chat.completions.create(
        model=SERVED_NAME, messages=nxt, temperature=0.0, max_tokens=150,
        extra_body={"session_id": whole, "ignore_eos": True, "return_token_ids": True}).model_dump()
    chunks = [c.model_dump(exclude_unset=True) for c in session_client.chat.completions.create(
        model=SERVED_NAME, messages=nxt, temperature=0.0, max_tokens=150, stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": streamed, "ignore_eos": True, "return_token_ids": True})]
    ids = [t for c in chunks if c["choices"] for t in (c["choices"][0].get("token_ids") or [])]
    assert ids == want["choices"][0]["token_ids"] and len(ids) == 150
    finishes = [c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finishes == ["length"] and len({c["id"] for c in chunks}) == 1
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1  # one answer: one role chunk
    assert chunks[-1]["usage"]["completion_tokens"] == 150
    assert chunks[-1]["session"]["segments"] == want["session"]["segments"] > 1


def test_a_turn_beyond_the_turn_limit_is_a_400_with_the_numbers(session_client):
    with pytest.raises(openai.BadRequestError, match=r"8011 tokens \(8001 new \+ max_tokens 10\).*8000"):
        session_client.completions.create(model=SERVED_NAME, prompt=[28] * 8001, max_tokens=10,
                                          extra_body={"session_id": sid()})


def test_an_abort_during_the_chunks_leaves_the_session_as_before(session_client, session_server):
    s, clean = sid(), sid()
    for x in (s, clean):
        session_client.completions.create(model=SERVED_NAME, prompt="A short start.", max_tokens=4,
                                          temperature=0.0, extra_body={"session_id": x})
    url = f"{session_server.url}/v1/sessions/{s}"
    before = httpx.get(url, headers={"Authorization": "Bearer unused"}, timeout=60).json()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the chunks run
        httpx.post(session_server.url + "/v1/completions", timeout=httpx.Timeout(60, read=1.0),
                   headers={"Authorization": "Bearer unused"},
                   json={"model": SERVED_NAME, "prompt": LONG_TEXT * 2, "max_tokens": 8,
                         "session_id": s})
    import time
    deadline = time.monotonic() + 60
    while True:  # the lease goes when vLLM has aborted the pass in flight
        try:
            a = session_client.completions.create(
                model=SERVED_NAME, prompt=" And then?", max_tokens=8, temperature=0.0,
                extra_body={"session_id": s, "return_token_ids": True}).model_dump()
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    b = session_client.completions.create(
        model=SERVED_NAME, prompt=" And then?", max_tokens=8, temperature=0.0,
        extra_body={"session_id": clean, "return_token_ids": True}).model_dump()
    assert a["session"]["turns"] == before["turns"] + 1 == 2
    assert a["choices"][0]["prompt_token_ids"] == b["choices"][0]["prompt_token_ids"]
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["session"]["recomputed_tokens"] == 0  # the session's own pins survived the abort
