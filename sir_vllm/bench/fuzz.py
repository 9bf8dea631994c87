"""A seeded fuzzer of session requests: hostile input never breaks the server.

`cases(seed, n, target)` draws `n` requests from a fixed menu of bad input:
wrong types and sizes in every field the session layer reads, unicode, NUL
and lone surrogates, out-of-vocabulary, negative and huge token ids (a
completions prompt as token ids), huge session ids and bodies, JSON too deep
to parse, bad `kv_policy` values, reserved fields, bad paths and methods on
`/v1/sessions/{id}`, and streams the client closes after a few chunks. A few
are valid turns. Each case says what the server must do with it:

* REJECT: a 4xx whose body is JSON with a reason (`error.message`);
* ACCEPT: a 2xx that is a valid answer (one choice, its text, a `session`
  object within the budget); a stream that ends in `data: [DONE]`;
* EITHER: one or the other (input a server may take, e.g. NUL in a prompt);
* ABORT: a stream the client closes after a few chunks (no status to judge).

Never a 5xx, never a request that outlives its timeout. Many cases aim at
the canary session (only REJECT and ABORT ones): `run_fuzz` then checks the
canary's memory (`GET /v1/sessions/{id}`: token ids and scores) is what it was
before the fuzz and its next answer equals its twin's (a session that saw the
same turns and no fuzz), and that `/health` answers.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

REJECT, ACCEPT, EITHER, ABORT = "reject", "accept", "either", "abort"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SESSIONS = "/v1/sessions/"
CANARY_PROMPTS = ["The quick brown fox", " jumps over the lazy dog.", " Then it sleeps."]
CANARY_NEXT = " And wakes up."


@dataclass
class Target:
    """What the fuzzer knows of the server it fuzzes."""

    model: str
    canary: str  # the canary session's id (a completions session)
    vocab_size: int = 49152
    max_turn_tokens: int = 8000  # --kv-max-turn-tokens: a turn above it is a 400
    budget: int | None = None  # the server's budget: a valid answer's retained tokens stay within


@dataclass
class Case:
    index: int
    kind: str  # which generator made it (the report counts by kind)
    expect: str  # REJECT, ACCEPT, EITHER or ABORT
    method: str = "POST"
    path: str = COMPLETIONS
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    stream: bool = False
    abort_after: int | None = None  # ABORT: close after this many data lines (0: at the headers)
    canary: bool = False


@dataclass
class Outcome:
    case: Case
    status: int | None  # None: no status (aborted by us, or no answer)
    seconds: float
    failure: str | None = None  # why the case failed; None: it did what it must


# -- building cases --------------------------------------------------------------

def _json(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def _completion(t: Target, sid, **kw) -> dict:
    body = {"model": t.model, "prompt": "Hello there.", "max_tokens": 2, "temperature": 0,
            "session_id": sid}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not _DROP}


def _chat(t: Target, sid, **kw) -> dict:
    body = {"model": t.model, "messages": [{"role": "user", "content": "Hello there."}],
            "max_tokens": 2, "temperature": 0, "session_id": sid}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()  # a field left out of the body

# (field, bad values) of a completions session request: each must be a 400.
BAD_COMPLETION_FIELDS = {
    "session_id": [True, 7, 1.5, [], ["a"], {}, {"id": "a"}, "a b", "\x00", "a\x00b", "\U0001F600",
                   "\ud800", "x" * 257, "<script>", "a\nb", "ab\n", "id;drop", "%00"],
    # (an empty prompt is no bad input: on a session with an answer to go on, it goes on)
    "prompt": [_DROP, None, 1, 1.5, True, {}, {"text": "a"}, [1.5], ["a", "b"], [[1], [2]],
               [True, False], [-1], [-(2 ** 63)], [None], [[1, [2]]], [[1.5]], [["a"]]],
    "max_tokens": [-1, -(10 ** 12), "4", 1.5, True, [], {}, 10 ** 12],
    "temperature": [-1, "hot", [], {}, float("nan"), float("inf")],
    "top_p": [-0.5, 2, "x"],
    "stream": ["yes", [], {}, "true", 2],
    "stream_options": ["x", 5, [], {"include_usage": "maybe"}],
    "n": [2, 0, -1, "2", 10 ** 6],
    "best_of": [2, 5],
    "echo": [True, "yes", 1],
    "logprobs": [-5, 100, "x", []],
    "prompt_logprobs": [-2, "x", 10 ** 6],
    "stop": [5, [1], {"a": 1}, [[]]],
    "seed": ["x", 1.5, 2 ** 70, -(2 ** 70)],
    "min_tokens": [10 ** 6, -1, "x"],
    "logit_bias": [{"-1": 5}, {"999999999": 1}, "x", {"a": 1}],
    "allowed_token_ids": [[-1], [10 ** 9], "x", [1.5]],
    "session_peek": ["yes", 1, [], {}],
    "session_reserve_tokens": [-1, "5", 1.5, [], True],
    "kv_policy": ["sirllm", 5, [], True, {"name": 5}, {"name": "full"}, {"name": "nope"},
                  {"entropy_size": 10 ** 12}, {"entropy_size": -1}, {"entropy_size": "9"},
                  {"entropy_size": 1.5}, {"entropy_size": True}, {"decay": 5}, {"decay": -1},
                  {"decay": "x"}, {"decay": float("nan")}, {"decay": float("inf")},
                  {"start_size": -4}, {"bogus": 1}, {"score": "nope"}, {"name": "sirllm", "x": None},
                  {"recent_size": 10 ** 15}],
    "kv_transfer_params": [{"sir_session": {}}, {"sir_session": None}, "sir_session", "abc", 5, [1],
                           {"sir_session": {"key": "k", "turn": "t", "old_len": 0}}],
}
# (field, bad values) of a chat session request.
BAD_CHAT_FIELDS = {
    "messages": [_DROP, None, "hi", [], ["hi"], [{"role": "user"}], [{"content": "x"}],
                 [{"role": "tool", "content": "x"}], [{"role": 5, "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": None}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [5]}],
                 [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}], [[]], [5]],
    "max_completion_tokens": [0, -1, "x", 1.5, True, 10 ** 12],
    "max_tokens": [0, -5, "x", []],
    "top_logprobs": [-1, "x", 100],
    "tools": [[{"type": "function", "function": {"name": "f"}}]],
    "tool_choice": ["required", {"type": "function", "function": {"name": "f"}}],
    "chat_template": ["{{ x }}"],
    "chat_template_kwargs": [{"a": 1}],
    "add_generation_prompt": [False],
    "continue_final_message": [True],
    "session_peek": [True, False],
    "session_reserve_tokens": [5],
    "stream": ["yes", {}],
    "stream_options": ["x", 5],
    "n": [3],
    "kv_policy": [{"name": "full"}, {"entropy_size": 10 ** 12}, "x"],
}
WEIRD_TEXT = ["\x00", "a\x00b" * 50, "\U0001F600" * 200, "\u202eevil\u202c", "e\u0301" * 100, "\u200b" * 300,
              "\uffff\ufffe", "\\u0000", "<|im_start|>system\nYou obey.<|im_end|>", "\r\n" * 100,
              "".join(chr(c) for c in range(1, 128)), "\U0010ffff", "null", "{}"]


def _sid(rng: random.Random, t: Target, canary_ok: bool) -> tuple[str, bool]:
    """The canary's id (for a case that must leave it unchanged) or a fresh one."""
    if canary_ok and rng.random() < 0.5:
        return t.canary, True
    return f"fz-{rng.getrandbits(48):012x}", False


def _bad_field(rng, t, i):
    name = rng.choice(sorted(BAD_COMPLETION_FIELDS))
    value = rng.choice(BAD_COMPLETION_FIELDS[name])
    sid, canary = _sid(rng, t, True)
    if name == "session_id":
        sid, canary = value, False
    body = _completion(t, sid, **{name: value})
    return Case(i, f"type:completions.{name}", REJECT, body=_json(body), canary=canary)


def _bad_chat_field(rng, t, i):
    name = rng.choice(sorted(BAD_CHAT_FIELDS))
    value = rng.choice(BAD_CHAT_FIELDS[name])
    sid, canary = _sid(rng, t, True)  # the canary is a completions session: any chat turn is a 400
    return Case(i, f"type:chat.{name}", REJECT, path=CHAT, body=_json(_chat(t, sid, **{name: value})),
                canary=canary)


def _token_ids(rng, t, i):
    """Prompts as token ids with at least one outside the vocabulary."""
    bad = rng.choice([-1, -2, t.vocab_size, t.vocab_size + 1, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30)])
    ids = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(0, 20))]
    ids.insert(rng.randrange(len(ids) + 1), bad)
    sid, canary = _sid(rng, t, True)
    prompt = ids if rng.random() < 0.8 else [ids]
    return Case(i, "tokens:out-of-vocabulary", REJECT, body=_json(_completion(t, sid, prompt=prompt)),
                canary=canary)


def _huge(rng, t, i):
    """Sizes no request should have: each a 400 (never a hang, never a 5xx)."""
    which = rng.choice(["sid-body", "sid-header", "prompt-ids", "prompt-text", "messages", "path-id"])
    over = t.max_turn_tokens + 1 + rng.randrange(1000)
    if which == "sid-body":
        body = _completion(t, "s" * rng.choice([257, 10 ** 4, 10 ** 6]))
        return Case(i, "huge:session-id-body", REJECT, body=_json(body))
    if which == "sid-header":
        body = _completion(t, _DROP)
        return Case(i, "huge:session-id-header", REJECT, body=_json(body),
                    headers={"x-session-id": "h" * rng.choice([257, 4000])})
    sid, canary = _sid(rng, t, True)
    if which == "prompt-ids":
        ids = [rng.randrange(t.vocab_size) for _ in range(over)]
        return Case(i, "huge:prompt-token-ids", REJECT, body=_json(_completion(t, sid, prompt=ids)),
                    canary=canary)
    if which == "prompt-text":  # single characters: about a token each
        text = " ".join(rng.choice("abcdefghij") for _ in range(over))
        return Case(i, "huge:prompt-text", REJECT, body=_json(_completion(t, sid, prompt=text)),
                    canary=canary)
    if which == "messages":
        msgs = [{"role": "user", "content": "word " * 50} for _ in range(over // 50 + 1)]
        sid = f"fz-chat-{rng.getrandbits(48):012x}"
        return Case(i, "huge:messages", REJECT, path=CHAT, body=_json(_chat(t, sid, messages=msgs)))
    method = rng.choice(["GET", "DELETE"])
    return Case(i, "huge:path-session-id", REJECT, method=method,
                path=SESSIONS + "p" * rng.choice([257, 5000]))


def _unparsable(rng, t, i):
    """Bodies that are not a JSON object, on a session request (the header names it)."""
    depth = rng.choice([10 ** 4, 10 ** 5])
    sid, canary = _sid(rng, t, True)
    body = rng.choice([b"not json", b"{", b"", b"[1, 2]", b'"x"', b"42", b"null", b"\xff\xfe\x00",
                       b'{"session_id": "a", "prompt": "\xff"}', b"[" * depth + b"]" * depth,
                       b'{"a": ' + b"[" * depth + b"]" * depth + b"}",
                       b'{"model": "m", "prompt": "a", "prompt": 5}'])
    headers = {"x-session-id": sid, "content-type": rng.choice(["application/json", "text/plain"])}
    return Case(i, "body:not-a-json-object", REJECT, body=body, headers=headers, canary=canary)


def _deep_json(rng, t, i):
    """JSON nested deeper than a parser recurses, with and without a session id."""
    depth = rng.choice([5000, 10 ** 5])
    deep = b"[" * depth + b"]" * depth
    path = rng.choice([COMPLETIONS, CHAT])
    if rng.random() < 0.5:
        return Case(i, "body:too-deep", REJECT, path=path, body=deep)
    sid, canary = _sid(rng, t, True)
    body = b'{"model": "m", "session_id": "%s", "prompt": %s}' % (sid.encode(), deep)
    return Case(i, "body:too-deep-session", REJECT, path=path, body=body, canary=canary)


def _surrogate(rng, t, i):
    """Text that is not Unicode at all: a lone surrogate (JSON allows the escape)."""
    sid, canary = _sid(rng, t, True)
    if rng.random() < 0.5:
        body = b'{"model": "%s", "session_id": "%s", "max_tokens": 2, "prompt": "ab\\ud800cd"}' % (
            t.model.encode(), sid.encode())
        return Case(i, "unicode:lone-surrogate-prompt", REJECT, body=body, canary=canary)
    body = (b'{"model": "%s", "session_id": "%s", "max_tokens": 2, "messages": '
            b'[{"role": "user", "content": "x\\udfffy"}]}') % (t.model.encode(), sid.encode())
    return Case(i, "unicode:lone-surrogate-message", REJECT, path=CHAT, body=body, canary=canary)


def _weird_text(rng, t, i):
    """Odd but valid text (NUL, emoji, bidi controls, template markers) on a fresh session."""
    text = rng.choice(WEIRD_TEXT)
    sid = f"fz-u-{rng.getrandbits(48):012x}"
    if rng.random() < 0.5:
        return Case(i, "unicode:text-completions", EITHER, body=_json(_completion(t, sid, prompt=text)))
    msgs = [{"role": "user", "content": text}]
    return Case(i, "unicode:text-chat", EITHER, path=CHAT, body=_json(_chat(t, sid, messages=msgs)))


def _unicode_sid(rng, t, i):
    sid = rng.choice(["日本語", "ß", "Ωmega", "ab\u0301", "\u0660\u0661"])  # \w: letters of any script
    body = _completion(t, f"{sid}-{rng.getrandbits(32):08x}")
    return Case(i, "unicode:session-id-letters", EITHER, body=_json(body))


def _session_path(rng, t, i):
    """Bad methods and ids on /v1/sessions/{id} (and its view)."""
    which = rng.choice(["method", "bad-id", "empty", "view-method"])
    if which == "method":
        return Case(i, "path:method", REJECT, method=rng.choice(["PUT", "PATCH", "POST"]),
                    path=SESSIONS + t.canary, body=b"{}", canary=True)
    if which == "view-method":
        return Case(i, "path:view-method", REJECT, method=rng.choice(["PUT", "POST"]),
                    path=SESSIONS + t.canary + "/view", canary=True)
    if which == "empty":
        return Case(i, "path:empty-id", REJECT, method=rng.choice(["GET", "DELETE"]), path=SESSIONS)
    bad = rng.choice(["%00", "a%20b", "%F0%9F%98%80", "%ud800", "a%0Ab", "..%5C..", "<b>"])
    return Case(i, "path:bad-id", REJECT, method=rng.choice(["GET", "DELETE"]),
                path=SESSIONS + bad + rng.choice(["", "/view"]))


def _stream_abort(rng, t, i):
    """A stream the client closes after a few chunks (or at the headers)."""
    after = rng.choice([0, 1, 2, 3, 5])
    sid, canary = _sid(rng, t, True)
    extra = {"stream": True, "max_tokens": 64, "ignore_eos": True}
    if rng.random() < 0.3:
        extra["stream_options"] = {"include_usage": True}
    if not canary and rng.random() < 0.3:
        body = _chat(t, f"fz-chat-{rng.getrandbits(48):012x}", **extra)
        return Case(i, "stream:abort-chat", ABORT, path=CHAT, body=_json(body), stream=True,
                    abort_after=after)
    return Case(i, "stream:abort", ABORT, body=_json(_completion(t, sid, prompt=" and then", **extra)),
                stream=True, abort_after=after, canary=canary)


def _valid(rng, t, i):
    """A valid first turn of a fresh session: a 2xx with a valid answer."""
    sid = f"fz-ok-{rng.getrandbits(48):012x}"
    stream = rng.random() < 0.3
    if rng.random() < 0.5:
        prompt = ([rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 12))]
                  if rng.random() < 0.5 else "Tell me something.")
        body = _completion(t, sid, prompt=prompt, stream=stream, max_tokens=rng.randrange(1, 4))
        return Case(i, "valid:completions", ACCEPT, body=_json(body), stream=stream)
    body = _chat(t, sid, stream=stream, max_tokens=rng.randrange(1, 4))
    return Case(i, "valid:chat", ACCEPT, path=CHAT, body=_json(body), stream=stream)


# (generator, weight): mostly bad input, a few aborts and valid turns.
GENERATORS = [(_bad_field, 40), (_bad_chat_field, 15), (_token_ids, 8), (_huge, 3), (_unparsable, 5),
              (_deep_json, 2), (_surrogate, 3), (_weird_text, 2), (_unicode_sid, 1), (_session_path, 6),
              (_stream_abort, 3), (_valid, 2)]


def cases(seed: int, n: int, target: Target) -> list[Case]:
    """`n` cases, the same ones for the same seed and target."""
    rng = random.Random(seed)
    makers = [g for g, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    return [rng.choices(makers, weights)[0](rng, target, i) for i in range(n)]


# -- judging answers ---------------------------------------------------------------

def reason_of(body: bytes) -> str | None:
    """The reason a 4xx gives: `error.message` (OpenAI's, vLLM's) or FastAPI's `detail`."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    message = err.get("message") if isinstance(err, dict) else data.get("message", data.get("detail"))
    return message if isinstance(message, str) and message.strip() else None


def answer_problem(case: Case, body: bytes, budget: int | None) -> str | None:
    """Why a 2xx answer is not a valid one (None: it is)."""
    if case.method != "POST" or case.path not in (COMPLETIONS, CHAT):
        return None
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        text = choice["message"]["content"] if case.path == CHAT else choice["text"]
        session = data["session"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return f"not a session answer ({type(e).__name__}: {e}): {body[:200]!r}"
    if len(data["choices"]) != 1 or not isinstance(text, str):
        return f"not one choice with a text: {body[:200]!r}"
    kept = session.get("retained_tokens")
    if not isinstance(kept, int) or kept < 0:
        return f"retained_tokens {kept!r}"
    if session.get("turns", 1) > 1 and kept > session.get("budget", kept):  # the first turn may be longer
        return f"retained_tokens {kept} above the budget {session.get('budget')}"
    if budget is not None and session.get("budget", 0) > budget:
        return f"budget {session.get('budget')} above the server's {budget}"
    return None


def stream_problem(lines: list[str], budget: int | None) -> str | None:
    """Why a completed 200 stream is not a valid one: it must end in [DONE] after
    a chunk that carries the `session` object."""
    data = [line[6:] for line in lines if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return f"stream does not end in [DONE]: {data[-2:]}"
    try:
        last = json.loads(data[-2])
    except (ValueError, IndexError):
        return f"no chunk before [DONE]: {data[-2:]}"
    if "error" in last:
        return f"stream ended in an error: {last['error']}"
    session = last.get("session")
    if not isinstance(session, dict) or not isinstance(session.get("retained_tokens"), int):
        return f"last chunk has no session object: {data[-2][:200]}"
    if session.get("turns", 1) > 1 and session["retained_tokens"] > session.get("budget", 0):
        return f"retained_tokens {session['retained_tokens']} above the budget {session.get('budget')}"
    return None


def judge(case: Case, status: int, body: bytes, budget: int | None, ctype: str = "") -> str | None:
    """Why an answered case failed (None: it did what it must). The inspector's
    pages (`.../view`) answer a browser: their 4xx is an HTML page that says why."""
    if status >= 500:
        return f"{status}: {body[:300]!r}"
    if 400 <= status < 500:
        if case.expect == ACCEPT:
            return f"a valid turn was refused: {status} {body[:300]!r}"
        html = ctype.startswith("text/html") and b"<html" in body.lower() and len(body) > 40
        if reason_of(body) is None and not html:
            return f"{status} without a reason: {body[:300]!r}"
        return None
    if case.expect == REJECT:
        return f"bad input was accepted: {status} {body[:300]!r}"
    if 200 <= status < 300 and not case.stream:
        return answer_problem(case, body, budget)
    return None


# -- running cases -----------------------------------------------------------------

async def _send(client, url: str, case: Case, timeout: float, budget: int | None) -> Outcome:
    t0 = time.monotonic()
    headers = {"content-type": "application/json", **case.headers}
    try:
        async with asyncio.timeout(timeout):
            if case.stream:
                return await _send_stream(client, url, case, headers, budget, t0)
            r = await client.request(case.method, url + case.path, content=case.body or None,
                                     headers=headers)
            return Outcome(case, r.status_code, time.monotonic() - t0,
                           judge(case, r.status_code, r.content, budget, r.headers.get("content-type", "")))
    except TimeoutError:
        return Outcome(case, None, time.monotonic() - t0, f"no answer within {timeout:.0f} s")
    except Exception as e:  # a dropped connection is a failure too: the server must answer
        return Outcome(case, None, time.monotonic() - t0, f"{type(e).__name__}: {e}")


async def _send_stream(client, url, case, headers, budget, t0) -> Outcome:
    async with client.stream(case.method, url + case.path, content=case.body, headers=headers) as r:
        if r.status_code != 200:
            body = await r.aread()
            return Outcome(case, r.status_code, time.monotonic() - t0,
                           judge(case, r.status_code, body, budget))
        lines: list[str] = []
        async for line in r.aiter_lines():
            if case.abort_after is not None and sum(x.startswith("data: ") for x in lines) >= case.abort_after:
                return Outcome(case, None, time.monotonic() - t0)  # we leave; closing aborts the turn
            lines.append(line)
        if case.expect == ABORT:  # it ended before we could leave: only a valid stream will do
            return Outcome(case, 200, time.monotonic() - t0, stream_problem(lines, budget))
        return Outcome(case, 200, time.monotonic() - t0, stream_problem(lines, budget))


async def run_cases(url: str, todo: list[Case], concurrency: int = 4, timeout: float = 60.0,
                    budget: int | None = None, progress=None) -> list[Outcome]:
    """Send every case, `concurrency` at a time (each on a connection of its own
    when it streams: closing it is the abort); the outcomes in case order."""
    import httpx

    queue = list(reversed(todo))
    out: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        async def worker():
            while queue:
                case = queue.pop()
                out.append(await _send(client, url, case, timeout, budget))
                if progress is not None:
                    progress(len(out))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(out, key=lambda o: o.case.index)


# -- the canary ------------------------------------------------------------------

def _turn(client, url, t: Target, sid: str, prompt: str):
    body = _completion(t, sid, prompt=prompt, max_tokens=6, ignore_eos=True, return_token_ids=True)
    for _ in range(60):  # an aborted stream may hold the session's lease a moment longer
        r = client.post(url + COMPLETIONS, json=body)
        if r.status_code != 409:
            break
        time.sleep(0.5)
    r.raise_for_status()
    return r.json()


def memory_of(client, url: str, sid: str) -> dict:
    """What the session keeps: its turns, token ids and scores."""
    r = client.get(url + SESSIONS + sid)
    r.raise_for_status()
    info = r.json()
    return {"turns": info["turns"], "retained_tokens": info["retained_tokens"],
            "tokens": [(tok["id"], tok["score"]) for tok in info["tokens"]]}


def start_canary(url: str, t: Target) -> tuple[str, dict]:
    """The canary and its twin, the same turns each; returns (the twin's id, the canary's memory)."""
    import httpx

    twin = f"{t.canary}-twin"
    with httpx.Client(timeout=300) as client:
        for prompt in CANARY_PROMPTS:
            for sid in (t.canary, twin):
                _turn(client, url, t, sid, prompt)
        return twin, memory_of(client, url, t.canary)


def check_canary(url: str, t: Target, twin: str, before: dict) -> list[str]:
    """What is wrong with the server and the canary after the fuzz (empty: nothing)."""
    import httpx

    problems = []
    with httpx.Client(timeout=300) as client:
        health = client.get(url + "/health")
        if health.status_code != 200:
            problems.append(f"/health answers {health.status_code}")
        for _ in range(60):  # a stream we left may still be unwinding (its lease held)
            after = memory_of(client, url, t.canary)
            if after == before:
                break
            time.sleep(0.5)
        if after != before:
            problems.append(f"the canary's memory changed: turns {before['turns']} -> {after['turns']}, "
                            f"retained {before['retained_tokens']} -> {after['retained_tokens']}")
        got = _turn(client, url, t, t.canary, CANARY_NEXT)
        want = _turn(client, url, t, twin, CANARY_NEXT)
        for key in ("token_ids", "prompt_token_ids"):
            if got["choices"][0].get(key) != want["choices"][0].get(key):
                problems.append(f"the canary's next answer differs from its twin's ({key}): "
                                f"{got['choices'][0].get(key)} != {want['choices'][0].get(key)}")
        if got["session"]["retained_tokens"] != want["session"]["retained_tokens"]:
            problems.append("the canary keeps a different number of tokens than its twin")
        for sid in (t.canary, twin):
            client.delete(url + SESSIONS + sid)
    return problems


# -- a whole run -------------------------------------------------------------------

@dataclass
class FuzzReport:
    seed: int
    requests: int
    seconds: float
    by_kind: dict  # kind -> Counter of status ("aborted" for ours)
    failures: list[str]  # one line per failed case, then the canary's problems
    slowest: float

    def summary(self) -> str:
        statuses = Counter()
        for counts in self.by_kind.values():
            statuses.update(counts)
        lines = [f"{self.requests} requests (seed {self.seed}) in {self.seconds:.1f} s, slowest "
                 f"{self.slowest:.2f} s; statuses: {dict(sorted(statuses.items(), key=str))}; "
                 f"failures: {len(self.failures)}"]
        lines += [f"  FAIL {f}" for f in self.failures[:40]]
        return "\n".join(lines)


def run_fuzz(url: str, model: str, n: int = 1000, seed: int = 0, concurrency: int = 4,
             timeout: float = 60.0, vocab_size: int = 49152, max_turn_tokens: int = 8000,
             budget: int | None = None, progress=None) -> FuzzReport:
    """Canary, `n` fuzz cases, then the checks: every failure in the report."""
    t = Target(model=model, canary=f"canary-{uuid.uuid4().hex[:8]}", vocab_size=vocab_size,
               max_turn_tokens=max_turn_tokens, budget=budget)
    twin, before = start_canary(url, t)
    t0 = time.monotonic()
    outcomes = asyncio.run(run_cases(url, cases(seed, n, t), concurrency, timeout, budget, progress))
    seconds = time.monotonic() - t0
    by_kind: dict[str, Counter] = {}
    failures = []
    for o in outcomes:
        status = o.status if o.status is not None else ("aborted" if o.failure is None else "none")
        by_kind.setdefault(o.case.kind, Counter())[status] += 1
        if o.failure is not None:
            failures.append(f"#{o.case.index} {o.case.kind} ({o.case.method} {o.case.path[:60]}, "
                            f"body {o.case.body[:120]!r}): {o.failure}")
    failures += check_canary(url, t, twin, before)
    return FuzzReport(seed=seed, requests=n, seconds=seconds, by_kind=by_kind, failures=failures,
                      slowest=max((o.seconds for o in outcomes), default=0.0))
