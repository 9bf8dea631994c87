"""Bad input never breaks the server (issue 15): the seeded fuzzer of session
requests (`sir_vllm.bench.fuzz`) against the shared SirLLM server, then
/health, and a canary session whose memory and next answer are as before.

The unit tests pin the fuzzer's own logic (its cases are the same for a seed,
its verdicts) and the request checks it led to (`server.requests`).
"""

from __future__ import annotations

import json

import pytest

from sir_vllm.bench import fuzz
from sir_vllm.policy import make_policy
from sir_vllm.server import requests as turn_requests
from sir_vllm.sessions import SessionError

from conftest import SERVED_NAME

TARGET = fuzz.Target(model="m", canary="canary-1", vocab_size=1000, max_turn_tokens=50)


# -- the fuzzer ----------------------------------------------------------------

def test_cases_are_the_same_for_a_seed_and_cover_every_generator():
    one, two = fuzz.cases(7, 3000, TARGET), fuzz.cases(7, 3000, TARGET)
    assert [(c.kind, c.body, c.path, c.headers) for c in one] == [
        (c.kind, c.body, c.path, c.headers) for c in two]
    assert fuzz.cases(8, 50, TARGET) != fuzz.cases(7, 50, TARGET)
    kinds = {c.kind.split(":")[0] for c in one}
    assert kinds == {"type", "tokens", "huge", "body", "unicode", "path", "stream", "valid"}
    # only cases that must leave a session as it was aim at the canary
    assert {c.expect for c in one if c.canary} <= {fuzz.REJECT, fuzz.ABORT}
    assert sum(c.canary for c in one) > 500


def test_verdicts():
    bad = fuzz.Case(0, "type:x", fuzz.REJECT)
    reason = json.dumps({"error": {"message": "max_tokens must be an integer"}}).encode()
    assert fuzz.judge(bad, 400, reason, None) is None
    assert fuzz.judge(bad, 422, b'{"detail": "There was an error parsing the body"}', None) is None
    assert "without a reason" in fuzz.judge(bad, 400, b"Bad Request", None)
    assert "without a reason" in fuzz.judge(bad, 400, b'{"error": {"message": ""}}', None)
    assert fuzz.judge(bad, 500, reason, None).startswith("500")
    assert "accepted" in fuzz.judge(bad, 200, b"{}", None)
    html = b"<!doctype html><html><body><h1>400</h1><p>session id: letters, digits ...</p></body></html>"
    assert fuzz.judge(bad, 400, html, None, "text/html; charset=utf-8") is None
    good = fuzz.Case(1, "valid:completions", fuzz.ACCEPT)
    answer = {"choices": [{"text": "hi"}], "session": {"retained_tokens": 9, "budget": 10}}
    assert fuzz.judge(good, 200, json.dumps(answer).encode(), 10) is None
    answer["session"]["retained_tokens"] = 11  # a first turn may be longer than the budget
    assert fuzz.judge(good, 200, json.dumps(answer).encode(), 10) is None
    answer["session"]["turns"] = 2
    assert "above the budget" in fuzz.judge(good, 200, json.dumps(answer).encode(), 10)
    assert "not a session answer" in fuzz.judge(good, 200, b'{"choices": []}', 10)
    assert "refused" in fuzz.judge(good, 400, reason, 10)
    ok = ['data: {"choices": []}', 'data: {"choices": [], "session": {"retained_tokens": 3}}',
          "data: [DONE]"]
    assert fuzz.stream_problem(ok, 10) is None
    assert "[DONE]" in fuzz.stream_problem(ok[:2], 10)
    assert "session" in fuzz.stream_problem([ok[0], ok[2]], 10)


# -- the request checks it led to ---------------------------------------------------

POLICY = make_policy("sirllm", start_size=4, entropy_size=60, recent_size=0)


def refusal(parse, body) -> str:
    with pytest.raises(SessionError) as e:
        parse(body, "tenant", "sid", POLICY)
    assert e.value.status == 400
    return str(e.value)


@pytest.mark.parametrize("body, says", [
    ({"prompt": "a", "kv_transfer_params": "sir_session"}, "must be an object"),
    ({"prompt": "a", "kv_transfer_params": 5}, "must be an object"),
    ({"prompt": "a", "kv_transfer_params": [1]}, "must be an object"),
    ({"prompt": "a", "kv_transfer_params": {"sir_session": None}}, "reserved"),
    ({"prompt": "a", "echo": "yes"}, "echo"),
    ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "stream": True, "stream_options": "x"}, "stream_options must be an object"),
    ({"prompt": "a", "stream": True, "stream_options": {"include_usage": "maybe"}}, "true or false"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream=true"),
    ({"prompt": "a", "stream": 1}, "stream must be true or false"),
    ({"prompt": "ab\ud800cd"}, "lone surrogate at character 2"),
    ({"prompt": "a", "logprobs": []}, "logprobs must be an integer"),
    ({"prompt": "a", "prompt_logprobs": "x"}, "prompt_logprobs must be an integer"),
])
def test_completion_requests_refused(body, says):
    assert says in refusal(turn_requests.completion_request, body)


@pytest.mark.parametrize("body, says", [
    ({"messages": [{"role": "user", "content": "x\udfff"}]}, "messages[0].content: not valid Unicode"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "needs logprobs=true"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "true or false"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": 5}, "must be an object"),
])
def test_chat_requests_refused(body, says):
    assert says in refusal(turn_requests.chat_request, body)


def test_session_ids_and_bodies():
    for bad in (True, 7, 1.5, ["a"], {"id": "a"}):
        with pytest.raises(SessionError, match="must be a string"):
            turn_requests.session_id_of({"session_id": bad}, None)
    for bad in ("ab\n", "a\nb", "a" * 257, "a b", "\x00"):
        with pytest.raises(SessionError):
            turn_requests.check_session_id(bad)
    assert turn_requests.check_session_id("日本語-1") == "日本語-1"
    with pytest.raises(SessionError, match="nested too deeply"):
        turn_requests.parse_body(b"[" * 100_000 + b"]" * 100_000)
    assert turn_requests.parse_body(b"not json") is None
    assert turn_requests.parse_body(b'{"a": 1}') == {"a": 1}


# -- against the server ------------------------------------------------------------

def _fuzz(server, n: int, seed: int):
    report = fuzz.run_fuzz(server.url, SERVED_NAME, n=n, seed=seed, budget=100)  # conftest's 4+64+32
    print("\n" + report.summary())
    for kind, counts in sorted(report.by_kind.items()):
        print(f"  {kind}: {dict(sorted(counts.items(), key=str))}")
    assert not report.failures, report.summary()
    statuses = {s for counts in report.by_kind.values() for s in counts}
    assert 400 in statuses and 200 in statuses and "aborted" in statuses
    return report


def test_a_thousand_fuzzed_requests(session_server):
    _fuzz(session_server, 1000, seed=15)


@pytest.mark.slow
def test_ten_thousand_fuzzed_requests(session_server):
    _fuzz(session_server, 10_000, seed=1515)
