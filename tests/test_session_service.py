"""The sessions service without a server: planning, committing, streaming,
aborts, rollback and rebuild, the store's limits (fake engine: tests/fake_engine.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sir_vllm.policy import make_policy
from sir_vllm.sessions import (MemoryStore, ServiceConfig, SessionError, SessionService,
                               StoreLimits, TurnRequest)
from sir_vllm.sessions.engine import EngineError
from sir_vllm.sessions.history import REBUILD, chain_of, resolve

from fake_engine import FakeEngine, logprob, next_token

POLICY = make_policy("sirllm", start_size=4, entropy_size=40, recent_size=16)  # budget 60


@pytest.fixture(scope="module")
def renderer(bundled_model):
    from transformers import AutoTokenizer

    from sir_vllm.chat import ChatRenderer

    return ChatRenderer(AutoTokenizer.from_pretrained(str(bundled_model)))


def make_service(renderer=None, engine=None, limits=None, rollback=4, policy=POLICY, clock=None,
                 window=None):
    engine = engine or FakeEngine()
    store = MemoryStore(limits, clock=clock) if clock else MemoryStore(limits)
    service = SessionService(store, engine, ServiceConfig(policy, rollback, window=window),
                             renderer=lambda: renderer)
    store.on_drop = service.on_store_drop
    return service, engine, store


def run(coro):
    return asyncio.run(coro)


async def complete(service, req):
    async with service.turn(req) as turn:
        out = await turn.complete()
        return out, turn


def comp(sid, prompt, max_tokens=8, **kw):
    return TurnRequest(api="completions", tenant="t", session_id=sid, prompt=prompt,
                       max_tokens=max_tokens, **kw)


def chat(sid, messages, max_tokens=6, **kw):
    return TurnRequest(api="chat", tenant="t", session_id=sid, messages=messages,
                       max_tokens=max_tokens, **kw)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


# ---- completions turns ------------------------------------------------------

def test_a_turn_commits_prompt_and_answer_with_their_scores():
    service, engine, store = make_service()

    async def go():
        out, turn = await complete(service, comp("s", list(range(10, 30))))
        state = await store.get("t", "s")
        return out, turn, state

    out, turn, state = run(go())
    answer = out["choices"][0]["token_ids"]
    assert state.head.token_ids.tolist() == list(range(10, 30)) + answer[:-1]
    assert state.head.pending == answer[-1]
    # paper scores: x_0 gets the turn's max, then -log p of each token
    want = [-logprob(t) for t in range(11, 30)] + [-logprob(t) for t in answer[:-1]]
    np.testing.assert_allclose(state.head.scores, [max(want[:19])] + want)
    assert turn.session == {"id": "s", "turns": 1, "retained_tokens": 27, "loaded_tokens": 0,
                            "recomputed_tokens": 0, "evicted_tokens": 0, "budget": 60,
                            "chunks": 0, "segments": 1}
    body = engine.bodies[0]
    assert body["logprobs"] == 0 and body["prompt_logprobs"] == 0 and body["return_token_ids"]
    assert body["cache_salt"] == state.cache_salt and "echo" not in body


def test_the_budget_binds_from_the_second_turn_and_pins_are_expected_by_turn():
    service, engine, store = make_service()

    async def go():
        await complete(service, comp("s", list(range(10, 50))))
        first = await store.get("t", "s")
        _, turn = await complete(service, comp("s", list(range(60, 70))))
        return first, turn, await store.get("t", "s")

    first, turn, state = run(go())
    params = engine.bodies[1]["kv_transfer_params"]["sir_session"]
    assert params["expect"] == first.head.turn_id and params["old_len"] == first.head.size
    assert len(params["keep"]) == 60 - 10 - 8  # room for the new tokens and the answer
    assert turn.session["loaded_tokens"] == 42 and turn.session["recomputed_tokens"] == 0
    assert state.head.size <= 60 and turn.session["evicted_tokens"] == first.head.size - 42


def test_a_peek_changes_nothing():
    service, engine, store = make_service()

    async def go():
        await complete(service, comp("s", list(range(10, 30))))
        before = await store.get("t", "s")
        _, turn = await complete(service, comp("s", [5, 6], max_tokens=0, peek=True))
        return before, turn, await store.get("t", "s")

    before, turn, after = run(go())
    assert after is before and turn.session["peek"] is True
    assert engine.bodies[1]["cache_salt"].startswith(before.cache_salt + "-peek-")
    assert engine.pins[before.key][0] == before.head.turn_id  # the peek pinned nothing


def test_a_second_request_on_a_busy_session_is_a_409():
    service, _, _ = make_service()

    async def go():
        async with service.turn(comp("s", [1, 2, 3])):
            with pytest.raises(SessionError) as e:
                async with service.turn(comp("s", [4])):
                    pass
            return e.value.status

    assert run(go()) == 409


@pytest.mark.parametrize("streamed", [False, True])
def test_a_committed_turn_frees_its_session_before_its_answer_is_sent(streamed):
    """A client sends its next turn as soon as it has an answer (maybe to another
    API process): the lease goes at the commit, not after the answer's bytes;
    a turn that did not commit yet still holds it."""
    service, _, _ = make_service()

    async def go():
        async with service.turn(comp("s", [1, 2, 3], stream=streamed)) as turn:
            if streamed:
                pieces = turn.stream()
                chunk, final = await pieces.__anext__()
                busy = await service.store.lease("t", "s")  # mid-answer: still held
                while not final:
                    chunk, final = await pieces.__anext__()
            else:
                busy = None
                await turn.complete()
            free = await service.store.lease("t", "s")  # the answer not yet sent
            if streamed:
                await pieces.aclose()
        return busy, free, turn.session

    busy, free, session = run(go())
    assert busy is None and free is not None and session["turns"] == 1


def test_an_engine_error_commits_nothing():
    from sir_vllm.sessions.engine import EngineError

    service, engine, store = make_service()

    async def go():
        await complete(service, comp("s", list(range(10, 20))))
        before = await store.get("t", "s")
        engine.fail_with = EngineError(400, b'{"error": "too long"}')
        with pytest.raises(EngineError):
            await complete(service, comp("s", [1, 2]))
        engine.fail_with = None
        return before, await store.get("t", "s")

    before, after = run(go())
    assert after is before


# ---- streaming --------------------------------------------------------------

async def stream(service, req, stop_after=None):
    got = []
    async with service.turn(req) as turn:
        pieces = turn.stream()
        try:
            async for chunk, final in pieces:
                got.append((chunk, final))
                if stop_after is not None and len(got) >= stop_after:
                    break  # the client left
        finally:
            await pieces.aclose()
        return got, turn


def test_a_streamed_turn_commits_what_a_whole_one_does():
    s1, e1, st1 = make_service()
    s2, e2, st2 = make_service()

    async def go():
        await complete(s1, comp("s", list(range(10, 40))))
        _, whole = await complete(s1, comp("s", list(range(50, 65)), max_tokens=12))
        await complete(s2, comp("s", list(range(10, 40))))
        got, streamed = await stream(s2, comp("s", list(range(50, 65)), max_tokens=12, stream=True))
        return whole, got, streamed, await st1.get("t", "s"), await st2.get("t", "s")

    whole, got, streamed, a_state, b_state = run(go())
    assert e2.bodies[-1]["echo"] is True and "prompt_logprobs" not in e2.bodies[-1]
    assert a_state.head.token_ids.tolist() == b_state.head.token_ids.tolist()
    np.testing.assert_allclose(a_state.head.scores, b_state.head.scores)
    assert [final for _, final in got] == [False] * 11 + [True]  # the finish chunk is held
    assert streamed.session == {**whole.session}


def test_with_include_usage_the_usage_chunk_is_the_final_one():
    service, _, _ = make_service()
    req = comp("s", [1, 2, 3], max_tokens=4, stream=True,
               engine_body={"stream_options": {"include_usage": True}})
    got, turn = run(stream(service, req))
    assert [bool(c["choices"]) for c, _ in got] == [True] * 4 + [False]
    assert got[-1][1] is True and got[3][0]["choices"][0]["finish_reason"] == "length"
    assert turn.session["turns"] == 1


def test_a_stream_aborted_after_three_chunks_leaves_the_session_as_it_was():
    service, engine, store = make_service()
    clean, clean_engine, _ = make_service()

    async def go():
        await complete(service, comp("s", list(range(10, 40))))
        before = await store.get("t", "s")
        got, turn = await stream(service, comp("s", [7, 7, 7], max_tokens=20, stream=True),
                                 stop_after=3)
        assert turn.session is None and len(got) == 3
        after_abort = await store.get("t", "s")
        out, _ = await complete(service, comp("s", [8, 9], max_tokens=10))
        await complete(clean, comp("s", list(range(10, 40))))
        clean_out, _ = await complete(clean, comp("s", [8, 9], max_tokens=10))
        return before, after_abort, out, clean_out

    before, after_abort, out, clean_out = run(go())
    assert after_abort is before
    assert out["choices"][0]["token_ids"] == clean_out["choices"][0]["token_ids"]
    assert out["choices"][0]["prompt_token_ids"] == clean_out["choices"][0]["prompt_token_ids"]
    # the next turn still loads the pins the aborted turn left alone
    assert engine.bodies[-1]["kv_transfer_params"]["sir_session"]["expect"] == before.head.turn_id


def test_a_stream_whose_client_left_unseen_commits_nothing():
    """The engine finished the answer before anyone saw the disconnect (the
    server's sends to a gone client are silent): the turn still commits nothing."""
    service, engine, store = make_service()

    async def go():
        await complete(service, comp("s", list(range(10, 40))))
        before = await store.get("t", "s")
        engine.client_gone = True
        with pytest.raises(EngineError) as left:
            await stream(service, comp("s", [7, 7, 7], max_tokens=20, stream=True))
        assert left.value.status == 499 and b"left before the turn was committed" in left.value.body
        engine.client_gone = False
        return before, await store.get("t", "s")

    before, after = run(go())
    assert after is before


# ---- chat: continue, roll back, rebuild --------------------------------------

def answer_text(out):
    return out["choices"][0]["text"]


def chat_run(service, sid, turns, max_tokens=6):
    """Whole-history turns; returns the (messages, response, turn) of each."""
    async def go():
        history, done = [], []
        for text in turns:
            history.append(u(text))
            out, turn = await complete(service, chat(sid, list(history), max_tokens))
            done.append((list(history), out, turn))
            history.append(a(answer_text(out)))
        return done
    return run(go())


USERS = ["Hi, I am Ada.", "I like tea.", "Tell me a joke.", "Another one.", "What is my name?"]


def test_whole_history_and_only_new_messages_give_the_same_turns(renderer):
    s1, e1, _ = make_service(renderer)
    s2, e2, _ = make_service(renderer)
    chat_run(s1, "x", USERS)

    async def go():
        for text in USERS:
            await complete(s2, chat("x", [u(text)]))
    run(go())
    assert [b["prompt"] for b in e1.bodies] == [b["prompt"] for b in e2.bodies]


def test_regenerate_rolls_back_one_turn_and_answers_as_the_original_turn(renderer):
    service, engine, store = make_service(renderer)
    done = chat_run(service, "x", USERS)
    messages, original, _ = done[-1]

    async def go():
        out, turn = await complete(service, chat("x", messages))  # history without the last answer
        return out, turn, await store.get("t", "x")

    out, turn, state = run(go())
    assert turn.session["rolled_back_turns"] == 1 and turn.session["rebuilt"] is False
    assert engine.bodies[-1]["prompt"] == engine.bodies[len(USERS) - 1]["prompt"]
    assert out["choices"][0]["token_ids"] == original["choices"][0]["token_ids"]
    assert state.turns == len(USERS)  # the regenerated turn replaced the last one
    assert turn.session["recomputed_tokens"] == 0  # the first attempt's pins serve the replay
    # the pins of the undone turn are not taken for the rolled-back state's
    assert engine.bodies[-1]["kv_transfer_params"]["sir_session"]["expect"] != \
        engine.bodies[-2]["kv_transfer_params"]["sir_session"]["turn"]


def test_an_edit_three_turns_back_rolls_back_three_turns(renderer):
    service, engine, _ = make_service(renderer)
    fresh, fresh_engine, _ = make_service(renderer)
    done = chat_run(service, "x", USERS)
    edited = [*done[2][0][:-1], u("Tell me a riddle.")]  # turn 3 of 5, edited: 3 turns undone
    fresh_done = chat_run(fresh, "y", USERS[:2])

    async def go():
        out, turn = await complete(service, chat("x", edited))
        ref, _ = await complete(fresh, chat("y", [*fresh_done[1][0], a(answer_text(fresh_done[1][1])),
                                                  u("Tell me a riddle.")]))
        return out, turn, ref

    out, turn, ref = run(go())
    assert turn.session["rolled_back_turns"] == 3 and turn.session["turns"] == 3
    assert engine.bodies[-1]["prompt"] == fresh_engine.bodies[-1]["prompt"]
    assert out["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]


def test_an_edit_older_than_k_turns_rebuilds_from_the_history(renderer):
    service, engine, store = make_service(renderer, rollback=2)
    fresh, fresh_engine, _ = make_service(renderer)
    done = chat_run(service, "x", USERS)
    edited = [u("Hi, I am Bob."), a(answer_text(done[0][1])), u(USERS[1])]

    async def go():
        out, turn = await complete(service, chat("x", edited))
        ref, _ = await complete(fresh, chat("z", edited))
        return out, turn, ref, await store.get("t", "x")

    out, turn, ref, state = run(go())
    assert turn.session["rebuilt"] is True and turn.session["turns"] == 1
    assert engine.bodies[-1]["prompt"] == fresh_engine.bodies[-1]["prompt"]  # never the old memory
    assert out["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    assert state.head.messages == 4


def test_a_reused_session_id_rebuilds_on_its_first_whole_history(renderer):
    service, _, _ = make_service(renderer)
    chat_run(service, "x", USERS[:3])
    second = chat_run(service, "x", ["Bonjour.", "Ça va ?"])  # a new conversation, same id
    assert second[0][2].session["rebuilt"] is False  # one message: read as only-new (ambiguous)
    assert second[1][2].session["rebuilt"] is True and second[1][2].session["turns"] == 1


def test_resolution_rules():
    from sir_vllm.sessions.state import SessionState, Snapshot

    msgs = [u("a"), a("b"), u("c"), a("d")]
    chain = chain_of(msgs)
    state = SessionState(id="s", tenant="t", key="k", policy=POLICY,
                         head=Snapshot(turns=2, messages=4, chain=chain[4]),
                         history=(Snapshot(turns=1, messages=2, chain=chain[2]),))
    assert resolve(state, [*msgs, u("e")]).kind == "continue"
    assert resolve(state, [*msgs, u("e")]).new == [u("e")]
    assert resolve(state, [*msgs[:2], u("c2")]).rolled_back == 1
    assert resolve(state, [u("e")]).kind == "continue"  # only-new
    assert resolve(state, [u("x"), a("y"), u("z")]).kind == REBUILD
    assert resolve(state, [*msgs[:3], a(" d \n"), u("e")]).kind == "continue"  # whitespace aside
    assert resolve(state, msgs).rolled_back == 1  # the same history again: answered anew


# ---- the store's limits --------------------------------------------------------

def test_the_session_cap_drops_the_least_recently_used_and_its_pins():
    service, engine, store = make_service(limits=StoreLimits(max_sessions=3))

    async def go():
        for sid in "abcd":
            await complete(service, comp(sid, [1, 2, 3]))
        await asyncio.sleep(0)  # the background pin drop
        return [await store.get("t", s) for s in "abcd"]

    a_state, *rest = run(go())
    assert a_state is None and all(rest)
    assert store.counters.dropped_lru == 1 and len(engine.dropped) == 1


def test_idle_sessions_expire_after_the_ttl():
    now = [1000.0]
    service, _, store = make_service(limits=StoreLimits(ttl=60), clock=lambda: now[0])

    async def go():
        await complete(service, comp("s", [1, 2, 3]))
        state = await store.get("t", "s")
        object.__setattr__(state, "last_used", now[0])
        now[0] += 61
        return await store.get("t", "s")

    assert run(go()) is None and store.counters.expired == 1


def test_delete_frees_the_pins_without_a_turn():
    service, engine, store = make_service()

    async def go():
        await complete(service, comp("s", [1, 2, 3]))
        state = await store.get("t", "s")
        await service.delete("t", "s")
        with pytest.raises(SessionError) as e:
            await service.delete("t", "s")
        return state, e.value.status

    state, status = run(go())
    assert engine.dropped == [state.key] and state.key not in engine.pins and status == 404
    assert len(engine.bodies) == 1  # no forward pass for the delete


def test_state_round_trips_through_its_dict():
    from sir_vllm.sessions.state import SessionState

    service, _, store = make_service()

    async def go():
        await complete(service, comp("s", list(range(10, 40))))
        await complete(service, comp("s", list(range(60, 80))))
        return await store.get("t", "s")

    state = run(go())
    back = SessionState.from_dict(state.to_dict())
    assert back.head.token_ids.tolist() == state.head.token_ids.tolist()
    assert back.head.scores.tolist() == state.head.scores.tolist()
    assert back.history[0].turn_id == state.history[0].turn_id
    assert back.policy.to_dict() == state.policy.to_dict()
    assert back.trace == state.trace == ((1, 37, 0), (2, state.head.size, state.head.evicted_total))
    assert next_token([1]) == 1001  # the fake model is what the tests above assume


# ---- turns longer than the budget (issue 17) -------------------------------------

LONG = make_policy("sirllm", start_size=4, entropy_size=36, recent_size=0)  # budget 40, chunk 9


def test_a_message_four_times_the_budget_runs_in_chunks_within_the_budget():
    service, engine, store = make_service(policy=LONG)

    async def go():
        await complete(service, comp("s", list(range(10, 20)), max_tokens=4))
        before = await store.get("t", "s")
        out, turn = await complete(service, comp("s", list(range(100, 260)), max_tokens=6))
        return before, out, turn, await store.get("t", "s")

    before, out, turn, state = run(go())
    passes = engine.bodies[1:]
    assert turn.session["chunks"] == len(passes) - 1 >= 160 // 9 and turn.session["segments"] == 1
    assert all(len(b["prompt"]) <= 40 for b in passes)  # the engine never holds more than the budget
    fed = [t for b in passes for t in b["prompt"]]
    assert all(t in fed for t in range(100, 260))  # every new token was fed
    assert state.head.size <= 40 and state.turns == 2 and turn.session["turns"] == 2
    assert len(out["choices"][0]["token_ids"]) == 6
    keys = [b["kv_transfer_params"]["sir_session"] for b in passes]
    assert keys[0]["source"] == before.key and keys[0]["expect"] == before.head.turn_id
    assert all(k["key"] == before.key + "~long" for k in keys)  # the session's own pins untouched
    assert engine.pins[before.key][0] == state.head.turn_id  # until the last pass: then moved
    assert before.key + "~long" not in engine.pins


def test_a_first_turn_runs_whole_within_the_window_and_in_chunks_beyond_it():
    """A first turn longer than the budget is fed whole while it fits the
    model's window (as the reference code does); past the window, where one
    engine request would fail, it runs in chunks like any long turn."""
    service, engine, store = make_service(policy=LONG, window=64)

    async def go():
        await complete(service, comp("fits", list(range(100, 150)), max_tokens=4))
        fits_bodies = len(engine.bodies)
        _, beyond = await complete(service, comp("beyond", list(range(100, 200)), max_tokens=4))
        return fits_bodies, beyond, await store.get("t", "beyond")

    fits_bodies, beyond, state = run(go())
    assert fits_bodies == 1  # 50 + 4 <= 64: one request, though the budget is 40
    passes = engine.bodies[1:]
    assert beyond.session["chunks"] == len(passes) - 1 >= 100 // 9
    assert all(len(b["prompt"]) <= 40 for b in passes)  # 100 + 4 > 64: never past the budget
    assert [t for b in passes for t in b["prompt"]][:9] == list(range(100, 109))
    assert state.head.size <= 40 and state.turns == 1


def test_decay_applies_once_per_turn_not_per_chunk():
    decaying = make_policy("sirllm", start_size=4, entropy_size=36, recent_size=0, decay=0.5)
    service, _, store = make_service(policy=decaying)

    async def go():
        await complete(service, comp("s", [5, 6, 7], max_tokens=1))
        first = await store.get("t", "s")
        await complete(service, comp("s", list(range(100, 200)), max_tokens=2))
        return first, await store.get("t", "s")

    first, state = run(go())
    sink = first.head.scores[0]  # a sink is never evicted: its score shows the decay applied
    assert state.head.scores[0] == pytest.approx(sink * 0.5)


def test_an_answer_three_times_the_budget_runs_in_segments_as_one_answer():
    service, engine, store = make_service(policy=LONG)

    async def go():
        await complete(service, comp("s", list(range(10, 20)), max_tokens=4))
        out, turn = await complete(service, comp("s", [50, 51], max_tokens=120))
        return out, turn, await store.get("t", "s")

    out, turn, state = run(go())
    segs = engine.bodies[1:]
    assert turn.session["segments"] == len(segs) == -(-120 // 9) and turn.session["chunks"] == 0
    ids = out["choices"][0]["token_ids"]
    assert ids == [t for b in segs for t in engine_answer(b)] and len(ids) == 120
    assert out["usage"]["completion_tokens"] == 120
    assert out["choices"][0]["finish_reason"] == "length" and state.head.size <= 40
    # each segment starts from the token the one before it sampled last
    assert all(b["prompt"][-1] == engine_answer(a)[-1] for a, b in zip(segs, segs[1:]))


def engine_answer(body):
    out, seq = [], list(body["prompt"])
    for _ in range(body["max_tokens"]):
        out.append(next_token(seq))
        seq.append(out[-1])
    return out


def test_a_long_answer_streams_as_one_answer():
    service, engine, _ = make_service(policy=LONG)
    whole, _, _ = make_service(policy=LONG)

    async def go():
        await complete(service, comp("s", list(range(10, 20)), max_tokens=4))
        await complete(whole, comp("s", list(range(10, 20)), max_tokens=4))
        got, turn = await stream(service, comp("s", [50, 51], max_tokens=40, stream=True,
                                               engine_body={"stream_options": {"include_usage": True}}))
        ref, _ = await complete(whole, comp("s", [50, 51], max_tokens=40))
        return got, turn, ref

    got, turn, ref = run(go())
    ids = [t for c, _ in got for ch in c["choices"] for t in ch["token_ids"]]
    assert ids == ref["choices"][0]["token_ids"]
    finishes = [ch["finish_reason"] for c, _ in got for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["length"]  # one finish, at the answer's end
    assert len({c["id"] for c, _ in got}) == 1
    assert got[-1][1] and got[-1][0]["usage"]["completion_tokens"] == 40
    assert turn.session["segments"] == -(-40 // 9) and turn.session["turns"] == 2


def test_a_long_turn_aborted_midway_leaves_the_session_and_its_pins():
    service, engine, store = make_service(policy=LONG)

    async def go():
        await complete(service, comp("s", list(range(10, 20)), max_tokens=4))
        before = await store.get("t", "s")
        got, turn = await stream(service, comp("s", [50, 51], max_tokens=60, stream=True), stop_after=12)
        return before, turn, await store.get("t", "s")

    before, turn, after = run(go())
    assert turn.session is None and after is before
    assert engine.pins[before.key][0] == before.head.turn_id  # the session's pins, as before
    assert before.key + "~long" in engine.dropped  # the passes' pins freed


def test_a_turn_beyond_the_turn_limit_is_a_400():
    engine = FakeEngine()
    store = MemoryStore()
    service = SessionService(store, engine, ServiceConfig(LONG, max_turn_tokens=100),
                             renderer=lambda: None)

    async def go():
        with pytest.raises(SessionError) as e:
            async with service.turn(comp("s", list(range(90)), max_tokens=20)):
                pass
        return e.value

    err = run(go())
    assert err.status == 400 and "110 tokens (90 new + max_tokens 20)" in str(err)
    assert "--kv-max-turn-tokens" in str(err) and engine.bodies == []


def test_token_ids_outside_the_vocabulary_are_a_400_before_the_engine():
    engine = FakeEngine()
    service = SessionService(MemoryStore(), engine, ServiceConfig(POLICY, vocab_size=1000),
                             renderer=lambda: None)

    async def go(prompt):
        with pytest.raises(SessionError) as e:
            async with service.turn(comp("s", prompt)):
                pass
        return e.value

    for prompt, bad in (([1, 2, 1000], 1000), ([5, -1], -1)):
        err = run(go(prompt))
        assert err.status == 400 and f"token id {bad} is outside the vocabulary (0 to 999)" in str(err)
    assert engine.bodies == []
