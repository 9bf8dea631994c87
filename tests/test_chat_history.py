"""The conversation is what the client sends (issue 11), through the real
`vllm serve --kv-policy sirllm` (the shared server: budget 4 + 64 + 32, the
default 4 rollback turns) and the official `openai` client.

A regenerated answer (one turn rolled back) replays the turn on the KV the
first attempt saw: the same tokens as a session that never saw the first
attempt. A deeper rollback restores the session's ids and scores exactly, but
the KV of that older state is gone from the engine: its kept tokens are
recomputed from their ids, so the answer is what vLLM gives for that prompt
(a stock request on the same token ids). A rebuild is a first turn of the
whole history, as a fresh session's."""

from __future__ import annotations

import uuid

from conftest import SERVED_NAME

USERS = ["Hi! My name is Ada.", "I like green tea.", "Tell me a fun fact.", "Another one, please.",
         "What is my name?", "Thanks, bye."]


def sid() -> str:
    return f"hist-{uuid.uuid4().hex[:8]}"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def ask(client, session_id, messages, **extra):
    return client.chat.completions.create(
        model=SERVED_NAME, messages=messages, temperature=0.0, max_tokens=16,
        extra_body={"session_id": session_id, "return_token_ids": True, **extra}).model_dump()


def converse(client, session_id, users):
    """Whole-history turns; returns [(messages sent, response)]."""
    history, done = [], []
    for text in users:
        history.append(u(text))
        out = ask(client, session_id, list(history))
        done.append((list(history), out))
        history.append(a(out["choices"][0]["message"]["content"]))
    return done


def same_turn(x, y):
    cx, cy = x["choices"][0], y["choices"][0]
    assert cx["token_ids"] == cy["token_ids"]
    assert x["prompt_token_ids"] == y["prompt_token_ids"]
    assert x["session"]["retained_tokens"] == y["session"]["retained_tokens"]


def test_regenerate_rolls_back_the_last_turn(session_client):
    first, fresh = sid(), sid()
    done = converse(session_client, first, USERS[:3])
    again = ask(session_client, first, done[-1][0])  # the history without the last answer
    assert again["session"]["rolled_back_turns"] == 1 and again["session"]["rebuilt"] is False
    assert again["session"]["turns"] == 3
    ref = converse(session_client, fresh, USERS[:3])[-1][1]
    same_turn(again, ref)
    assert again["session"]["evicted_tokens"] == ref["session"]["evicted_tokens"] > 0


def stock_answer(client, prompt_ids):
    out = client.completions.create(model=SERVED_NAME, prompt=prompt_ids, max_tokens=16,
                                    temperature=0.0, extra_body={"return_token_ids": True})
    return out.model_dump()["choices"][0]["token_ids"]


def test_an_edit_three_turns_back(session_client):
    first, fresh = sid(), sid()
    done = converse(session_client, first, USERS[:5])
    edited = [*done[2][0][:-1], u("Tell me a riddle.")]
    out = ask(session_client, first, edited)
    s = out["session"]
    assert s["rolled_back_turns"] == 3 and s["turns"] == 3 and s["rebuilt"] is False
    base = converse(session_client, fresh, USERS[:2])
    ref = ask(session_client, fresh, [*base[-1][0], a(base[-1][1]["choices"][0]["message"]["content"]),
                                      u("Tell me a riddle.")])
    assert out["prompt_token_ids"] == ref["prompt_token_ids"]  # the state of turn 2, exactly
    assert s["retained_tokens"] == ref["session"]["retained_tokens"]
    assert s["recomputed_tokens"] == s["loaded_tokens"] + s["recomputed_tokens"] > 0
    assert out["choices"][0]["token_ids"] == stock_answer(session_client, out["prompt_token_ids"])


def test_an_edit_older_than_the_rollback_window_rebuilds(session_client):
    first, fresh = sid(), sid()
    done = converse(session_client, first, USERS)
    edited = [u("Hi! My name is Bob."), *done[1][0][1:]]  # turn 1 of 6: 5 turns back, K is 4
    out = ask(session_client, first, edited)
    assert out["session"]["rebuilt"] is True and out["session"]["turns"] == 1
    ref = ask(session_client, fresh, edited)  # a new session fed that history
    same_turn(out, ref)  # never the old memory (which holds "Ada") answering the new history


def test_a_reused_session_id_is_rebuilt_for_the_new_conversation(session_client):
    reused, fresh = sid(), sid()
    converse(session_client, reused, USERS[:3])
    new = ["Bonjour ! Je m'appelle Zoé.", "Quel temps fait-il ?"]
    done = converse(session_client, reused, new)
    assert done[0][1]["session"]["rebuilt"] is False  # one message: the only-new form (documented)
    second = done[1][1]
    assert second["session"]["rebuilt"] is True and second["session"]["turns"] == 1
    ref = ask(session_client, fresh, done[1][0])
    same_turn(second, ref)
