"""Chat sessions: `/v1/chat/completions` with a session id, through the real
`vllm serve --kv-policy sirllm` (the shared server, budget 4 + 64 + 32) and the
official `openai` client. A request carries only the new messages or the
whole history; either way a turn is the token stream the oracle builds."""

from __future__ import annotations

import uuid

import openai
import pytest
import requests

from sir_vllm.sessions import ChatError, normalize_messages

from conftest import SERVED_NAME

USERS = ["Hi! My name is Ada and I like green tea.",
         "Can you suggest a name for my cat?",
         "What is my name?"]
MAX_TOKENS = 24


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


# ---- no server ---------------------------------------------------------------

def test_a_chat_turns_default_answer_length():
    """budget // 4, at most 256, whatever the turn's size (a turn that then
    outgrows the room runs as a long turn)."""
    from sir_vllm.policy import make_policy
    from sir_vllm.sessions.service import chat_default_max_tokens as default

    assert default(make_policy("sirllm", start_size=4, entropy_size=96, recent_size=0)) == 25
    assert default(make_policy("sirllm", start_size=4, entropy_size=4092, recent_size=0)) == 256


def test_message_shapes():
    assert normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}]) == [u("a\nb")]
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(ChatError):
            normalize_messages(bad)


def test_one_user_message_renders_exactly_as_the_oracle_turn(bundled_model):
    from transformers import AutoTokenizer

    from sir_vllm.chat import ChatRenderer

    r = ChatRenderer(AutoTokenizer.from_pretrained(str(bundled_model)))
    first = r.messages_ids([u(USERS[0])], None)
    assert first == r.turn_ids(USERS[0], None)
    answer = r.encode("Hello Ada!") + [r.tokenizer.eos_token_id]
    assert r.messages_ids([u(USERS[1])], answer) == r.turn_ids(USERS[1], answer)
    cut = r.encode("Hello Ada, nice")  # a max_tokens cut: "<|im_end|>\n" is owed
    assert r.messages_ids([u(USERS[1])], cut) == r.turn_ids(USERS[1], cut)
    # the default system message comes with the first turn only
    assert r.tokenizer.decode(first).count("<|im_start|>system") == 1
    assert "<|im_start|>system" not in r.tokenizer.decode(r.messages_ids([u(USERS[1])], answer))


# ---- through the server -------------------------------------------------------

def new_sid() -> str:
    return f"chat-{uuid.uuid4().hex[:8]}"


def chat(client, sid, messages, header=False, raw=False, max_tokens=MAX_TOKENS, **extra):
    body = {"return_token_ids": True, **extra}
    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    if header:
        kwargs["extra_headers"] = {"X-Session-ID": sid}
    else:
        body["session_id"] = sid
    create = client.chat.completions.with_raw_response.create if raw else client.chat.completions.create
    out = create(model=SERVED_NAME, messages=messages, temperature=0.0,
                 logprobs=True, extra_body=body, **kwargs)
    return out if raw else out.model_dump()


def retained_ids(server, sid):
    r = requests.get(f"{server.url}/v1/sessions/{sid}", headers={"Authorization": "Bearer unused"},
                     timeout=60)
    r.raise_for_status()
    return r.json()


def test_new_messages_only_and_whole_history_match_each_other_and_the_oracle(
        session_client, session_server, bundled_model):
    from sir_vllm.policy import make_policy
    from sir_vllm.replay import ReferenceReplayer

    oracle = ReferenceReplayer(make_policy("sirllm", start_size=4, entropy_size=64, recent_size=32),
                               str(bundled_model))
    delta_sid, full_sid = new_sid(), new_sid()
    history: list[dict] = []
    evicted = 0
    for i, user in enumerate(USERS):
        d = chat(session_client, delta_sid, [u(user)])
        history.append(u(user))
        f = chat(session_client, full_sid, history)
        cd, cf = d["choices"][0], f["choices"][0]
        assert d["object"] == "chat.completion" and cd["message"]["role"] == "assistant"
        assert cd["token_ids"] == cf["token_ids"], f"turn {i}"
        assert d["prompt_token_ids"] == f["prompt_token_ids"], f"turn {i}"
        assert cd["message"]["content"] == cf["message"]["content"]
        assert d["session"] == {**f["session"], "id": delta_sid}
        history.append(a(cf["message"]["content"]))

        before = list(oracle.session.ids)
        mine, turn = oracle.turn(user, MAX_TOKENS, forced=cd["token_ids"])
        s = d["session"]
        assert s["turns"] == i + 1 and s["recomputed_tokens"] == 0
        kept = before if turn.kept is None else [before[k] for k in turn.kept]
        assert d["prompt_token_ids"][: s["loaded_tokens"]] == kept, f"turn {i}: different kept tokens"
        assert d["prompt_token_ids"][s["loaded_tokens"]:] == turn.input_ids, f"turn {i}: different prompts"
        assert s["retained_tokens"] == mine.retained <= 100
        assert [t["id"] for t in retained_ids(session_server, delta_sid)["tokens"]] == oracle.session.ids
        assert cd["message"]["content"] == mine.answer
        served = [c["logprob"] for c in cd["logprobs"]["content"]]
        for j, tok in enumerate(cd["token_ids"]):
            assert abs(served[j] - turn.logprobs[j]) <= 1e-3, f"turn {i} token {j}"
            assert tok == turn.greedy_ids[j] or turn.top_logprobs[j] - turn.logprobs[j] <= 1e-4
        assert d["usage"]["completion_tokens"] == len(cd["token_ids"])
        evicted = s["evicted_tokens"]
    assert evicted > 0, "three turns never evicted: the test does not exercise compaction"
    info = retained_ids(session_server, full_sid)
    assert info["api"] == "chat" and info["messages_consumed"] == len(history)
    assert "messages" not in info  # a session keeps no message list


def test_the_session_header_works_and_reports_the_retained_count(session_client, session_server):
    sid = new_sid()
    first = chat(session_client, sid, [u("Hello there.")], header=True, raw=True)
    body = first.parse().model_dump()
    assert int(first.headers["x-session-retained-tokens"]) == body["session"]["retained_tokens"]
    second = chat(session_client, sid, [u("How are you?")], header=True, max_tokens=None,
                  ignore_eos=True)
    assert second["session"]["turns"] == 2
    assert second["usage"]["completion_tokens"] == 100 // 4  # the default reservation: budget // 4
    assert second["session"]["loaded_tokens"] == body["session"]["retained_tokens"]
    assert retained_ids(session_server, sid)["messages_consumed"] == 4


def test_a_session_started_on_chat_stays_on_chat(session_client):
    sid = new_sid()
    chat(session_client, sid, [u("Hello.")])
    with pytest.raises(openai.BadRequestError, match="started on /v1/chat/completions"):
        session_client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=2,
                                          extra_body={"session_id": sid})


@pytest.mark.parametrize("extra, needle", [
    ({"n": 2}, "n and best_of must be 1"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"chat_template": "{{ messages }}"}, "server.s chat template"),
])
def test_unsupported_chat_options_are_a_400(session_client, extra, needle):
    with pytest.raises(openai.BadRequestError, match=needle):
        session_client.chat.completions.create(
            model=SERVED_NAME, messages=[u("Hi")], max_tokens=2,
            extra_body={"session_id": new_sid(), **extra})


def test_chat_without_a_session_is_stock(session_client):
    out = session_client.chat.completions.create(model=SERVED_NAME, messages=[u("Hi")], max_tokens=4,
                                                 temperature=0.0).model_dump()
    assert "session" not in out and out["choices"][0]["message"]["content"]
