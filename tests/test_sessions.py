"""Sessions through the real `vllm serve --kv-policy sirllm` and the official
`openai` client (one shared server, budget 4 + 64 + 32)."""

from __future__ import annotations

import uuid

import numpy as np
import openai
import pytest

from conftest import SERVED_NAME

BIG = {"name": "sirllm", "start_size": 4, "entropy_size": 2000, "recent_size": 0}


def turn(client, sid, prompt, max_tokens=24, **extra):
    body = {"session_id": sid, "return_token_ids": True, "ignore_eos": True, **extra}
    return client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0.0, logprobs=0, extra_body=body).model_dump()


def new_sid() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_prefix_carry_over_is_exact(session_client):
    """No eviction: turn 2 equals a plain request that sends the whole history."""
    sid = new_sid()
    r1 = turn(session_client, sid, "Alice keeps a red key in the blue box. Bob asks Alice:", kv_policy=BIG)
    r2 = turn(session_client, sid, " Where is the key? Alice says:")
    assert r2["session"]["loaded_tokens"] == r1["session"]["retained_tokens"] > 0
    history = r2["choices"][0]["prompt_token_ids"]
    assert history[: len(r1["choices"][0]["prompt_token_ids"])] == r1["choices"][0]["prompt_token_ids"]
    plain = session_client.completions.create(
        model=SERVED_NAME, prompt=history, max_tokens=24, temperature=0.0, logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True}).model_dump()
    a, b = r2["choices"][0], plain["choices"][0]
    assert a["token_ids"] == b["token_ids"]
    diff = np.abs(np.array(a["logprobs"]["token_logprobs"]) - np.array(b["logprobs"]["token_logprobs"]))
    assert diff.max() < 1e-4, diff.max()


def test_ten_turns_stay_within_the_budget(session_client):
    sid, budget = new_sid(), 4 + 64 + 32
    evicted = 0
    for i in range(10):
        r = turn(session_client, sid, f" Turn {i}: tell me one fact about the number {i * 7}.", max_tokens=32)
        s = r["session"]
        assert s["turns"] == i + 1 and s["budget"] == budget
        assert s["retained_tokens"] <= budget
        evicted = s["evicted_tokens"]
        assert r["choices"][0]["text"]
    assert evicted > 0, "the budget never forced an eviction"


def test_retained_count_is_in_a_header(session_client):
    raw = session_client.completions.with_raw_response.create(
        model=SERVED_NAME, prompt="Hello there.", max_tokens=4, temperature=0.0,
        extra_body={"session_id": new_sid()})
    body = raw.parse().model_dump()
    assert int(raw.headers["x-session-retained-tokens"]) == body["session"]["retained_tokens"]


def test_engine_keeps_stock_vllms_core_reservation(session_server):
    """The KV connector must not change the CPU engine's OpenMP binding
    (vllm_adapter.keep_stock_cpu_reservation): one core for the EngineCore loop."""
    log = session_server.log_path.read_text(errors="replace")
    assert "reserve_cpu_num=1" in log
    assert "should be greater than reserved CPU core" not in log


def test_requests_without_a_session_are_stock(session_client):
    kwargs = dict(model=SERVED_NAME, prompt="The capital of France is", temperature=0.0,
                  max_tokens=8, logprobs=0)
    first = session_client.completions.create(**kwargs).model_dump()
    second = session_client.completions.create(**kwargs).model_dump()
    assert "session" not in first
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["prompt_logprobs"] is None


@pytest.mark.parametrize("extra, max_tokens, needle", [
    ({"kv_policy": {"name": "sirllm", "decay": 2.0}}, 4, "decay"),
    ({"kv_policy": {"name": "streaming", "entropy_size": 8}}, 4, "entropy_size"),
    ({"kv_transfer_params": {"sir_session": {"id": "x", "old_len": 0}}}, 4, "reserved"),
])
def test_bad_input_is_a_400_with_the_reason(session_client, extra, max_tokens, needle):
    with pytest.raises(openai.BadRequestError) as e:
        session_client.completions.create(
            model=SERVED_NAME, prompt="Hello.", max_tokens=max_tokens, temperature=0.0,
            extra_body={"session_id": new_sid(), **extra})
    assert needle in str(e.value)
    # and the server keeps serving
    assert session_client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2).choices


def test_a_first_turn_longer_than_the_budget_is_served_and_the_next_evicts(session_client):
    """As in the reference code (and the oracle): nothing is cached before the
    first turn, so it is not refused for its size; the budget binds from the
    second turn, whose eviction brings the session back under it."""
    sid = new_sid()
    first = turn(session_client, sid, " four" * 120, max_tokens=4)["session"]
    assert first["retained_tokens"] > first["budget"] == 100
    second = turn(session_client, sid, " Five.", max_tokens=4)["session"]
    assert second["turns"] == 2 and second["retained_tokens"] <= 100


def test_a_later_turn_too_big_for_the_budget_is_fed_in_chunks(session_client):
    """A later turn larger than the room the budget leaves is not refused: it is
    fed in prefill-only chunks with eviction between them (long turns)."""
    sid = new_sid()
    turn(session_client, sid, "One two three.", max_tokens=8)
    second = turn(session_client, sid, " four" * 90, max_tokens=8)["session"]
    assert second["chunks"] >= 1 and second["retained_tokens"] <= second["budget"]
    assert turn(session_client, sid, " Five.", max_tokens=4)["session"]["turns"] == 3


def test_prompt_logprobs_of_loaded_rows_are_none_and_the_rest_match_a_plain_request(session_client):
    """patches/0002: rows of loaded positions are defined (never garbage); the
    middleware hides them, and the computed rows (the scores' source) are exact."""
    sid = new_sid()
    turn(session_client, sid, "Alice keeps a red key in the blue box.", kv_policy=BIG)
    r2 = turn(session_client, sid, " Bob asks where the key is.", prompt_logprobs=0)
    kept = r2["session"]["loaded_tokens"]
    rows = r2["choices"][0]["prompt_logprobs"]
    assert all(row is None for row in rows[: kept + 1])
    plain = session_client.completions.create(
        model=SERVED_NAME, prompt=r2["choices"][0]["prompt_token_ids"], max_tokens=1,
        temperature=0.0, extra_body={"prompt_logprobs": 0}).model_dump()
    want = plain["choices"][0]["prompt_logprobs"]
    for j in range(kept + 1, len(rows)):
        (tok, got), = rows[j].items()
        assert abs(got["logprob"] - want[j][tok]["logprob"]) < 1e-4, j


def _http(server, method, path):
    import requests

    # sessions are scoped to the API key the openai client sends ("unused")
    return requests.request(method, server.url + path, headers={"Authorization": "Bearer unused"},
                            timeout=60)


def test_get_and_delete_a_session(session_client, session_server):
    sid = new_sid()
    r = turn(session_client, sid, "Remember the word banana.", max_tokens=4)
    got = _http(session_server, "GET", f"/v1/sessions/{sid}")
    assert got.status_code == 200
    info = got.json()
    assert info["turns"] == 1 and info["retained_tokens"] == r["session"]["retained_tokens"]
    assert len(info["tokens"]) == info["retained_tokens"]
    # SmolLM2-135M in float32: 2 (K, V) x 30 layers x 3 KV heads x 64 dims x 4 bytes
    assert info["retained_bytes"] == info["retained_tokens"] * 2 * 30 * 3 * 64 * 4
    assert "banana" in "".join(t["text"] for t in info["tokens"])
    assert _http(session_server, "DELETE", f"/v1/sessions/{sid}").status_code == 200
    assert _http(session_server, "GET", f"/v1/sessions/{sid}").status_code == 404
    again = turn(session_client, sid, "Hello.", max_tokens=2)  # an unknown id starts afresh
    assert again["session"]["turns"] == 1 and again["session"]["loaded_tokens"] == 0


def test_another_api_key_cannot_see_a_session(session_client, session_server):
    import requests

    sid = new_sid()
    turn(session_client, sid, "Secret.", max_tokens=2)  # the client's key: "unused"
    url = session_server.url + f"/v1/sessions/{sid}"
    assert requests.get(url, headers={"Authorization": "Bearer other"}, timeout=60).status_code == 404
    assert requests.get(url, headers={"Authorization": "Bearer unused"}, timeout=60).status_code == 200


def test_concurrent_requests_on_one_session_get_409(session_client):
    from concurrent.futures import ThreadPoolExecutor

    sid = new_sid()
    turn(session_client, sid, "Start.", max_tokens=2)

    def one(_):
        try:
            turn(session_client, sid, " Go on.", max_tokens=24)
            return 200
        except openai.ConflictError:
            return 409

    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(one, range(4)))
    assert codes[0] == 200 and 409 in codes, codes
