"""Sessions that no longer fit the KV pool (issue 4): the least recently used
idle session loses its pinned KV (a log line), its next turn recomputes its
kept tokens from their ids, never another session's memory, and the server
keeps serving.

The unit tests drive the connector's scheduler role on a fake block pool; the
server test runs its own `vllm serve --kv-policy sirllm` whose KV pool holds
three blocks of 128 tokens (module-scoped: the one extra server of the suite).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import requests

pytest.importorskip("vllm")

from sir_vllm.connector.protocol import TurnParams, TurnReply  # noqa: E402

from conftest import SERVED_NAME, SESSION_POLICY_ARGS, started_server  # noqa: E402
from fake_block_pool import BS, Blocks, capped, pin, req  # noqa: E402


@pytest.fixture
def sched():
    return capped(0)  # the admission rule off, as `vllm serve` starts


def test_the_least_recently_used_idle_session_is_dropped_first(sched, caplog):
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "C", [4], when=3.0)
    pin(sched, "B", [2, 3], when=2.0)
    assert sched.block_pool.get_num_free_blocks() == 1
    stock = req("x", range(6), max_tokens=2)  # 8 tokens: 2 blocks, 1 free
    with caplog.at_level("WARNING", logger="vllm.sir_vllm.connector"):
        assert sched.get_num_new_matched_tokens(stock, 0) == (0, False)
    assert set(sched.pinned) == {"B", "C"} and sched.block_pool.get_num_free_blocks() == 3
    assert "dropped the pinned KV of idle session 's-A' (key A," in caplog.text
    # enough room: nothing more is dropped, however often the scheduler asks
    assert sched.get_num_new_matched_tokens(stock, 0) == (0, False)
    assert set(sched.pinned) == {"B", "C"}


def test_a_session_with_a_request_in_the_engine_is_never_dropped(sched):
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    pin(sched, "C", [4], when=3.0)
    # A's next turn is in the engine: its pins are what it loads
    a2 = req("A-2", [*range(100, 107), 7, 7, 50],
             TurnParams(key="A", turn="A-t2", old_len=8, expect="A-t1"), max_tokens=14)  # 6 blocks
    sched.on_new_request(a2)
    assert sched.get_num_new_matched_tokens(a2, 0) == (8, False)
    assert set(sched.pinned) == {"A"}  # B and C were dropped, oldest first; A kept
    sched.update_state_after_alloc(a2, Blocks([2, 3, 4]), 8)
    assert len(sched.build_connector_meta(None).loads) == 1


def test_a_session_whose_own_pins_fill_the_pool_recomputes_instead_of_waiting(sched, caplog):
    pin(sched, "A", [0, 1, 2, 3, 4, 5], when=1.0)  # A's last turn took the whole pool
    a2 = req("A-2", [*range(100, 108), 50, 51],  # 8 kept tokens and 2 new: 3 blocks
             TurnParams(key="A", turn="A-t2", old_len=24, keep=list(range(8)), expect="A-t1"))
    sched.on_new_request(a2)
    with caplog.at_level("WARNING", logger="vllm.sir_vllm.connector"):
        assert sched.get_num_new_matched_tokens(a2, 0) == (0, False)  # recomputed, not a hang
    assert sched.pinned == {} and sched.block_pool.get_num_free_blocks() == 6
    assert "dropped the pinned KV of waiting session 's-A'" in caplog.text
    sched.update_state_after_alloc(a2, Blocks([0, 1, 2]), 0)
    assert sched.build_connector_meta(None).loads == []
    assert sched.request_finished(a2, [0, 1, 2])[1] == TurnReply(
        pinned=a2.num_computed_tokens, recomputed=8).to_kv_transfer_params()


def test_waiting_sessions_pins_go_only_when_nothing_running_would_free_room(sched):
    pin(sched, "A", [0, 1, 2], when=1.0)
    pin(sched, "B", [3, 4, 5], when=2.0)
    a2, b2 = (req(f"{k}-2", [*range(100, 108), *range(50, 58)],  # 4 blocks each
                  TurnParams(key=k, turn=f"{k}-t2", old_len=12, keep=list(range(8)),
                             expect=f"{k}-t1")) for k in "AB")
    for r in (a2, b2):
        sched.on_new_request(r)
    # both wait; A's pins alone leave 3 blocks: B's go too (they would never leave)
    assert sched.get_num_new_matched_tokens(a2, 0) == (0, False)
    assert sched.pinned == {}


def test_a_running_sessions_pins_are_waited_for(sched):
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    a2 = req("A-2", [*range(100, 104), 50], TurnParams(key="A", turn="A-t2", old_len=8,
                                                      keep=list(range(4)), expect="A-t1"))
    sched.on_new_request(a2)
    assert sched.get_num_new_matched_tokens(a2, 0) == (4, False)
    sched.update_state_after_alloc(a2, Blocks([4, 5]), 4)  # A's next turn runs
    sched.block_pool.touch(sched.block_pool.blocks[4:6])
    b2 = req("B-2", [*range(100, 107), 7, *range(50, 58)],  # 4 blocks: none free now
             TurnParams(key="B", turn="B-t2", old_len=8, expect="B-t1"))
    sched.on_new_request(b2)
    # B2 waits: when A2 finishes, A's pins are idle and go, and B's own leave room
    assert sched.get_num_new_matched_tokens(b2, 0) == (8, False)
    assert set(sched.pinned) == {"A", "B"}


def test_a_dropped_session_recomputes_and_says_so(sched):
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    pin(sched, "C", [4], when=3.0)
    sched.get_num_new_matched_tokens(req("x", range(6)), 0)  # drops A
    a2 = req("A-2", [*range(100, 107), 7, 7, 50],
             TurnParams(key="A", turn="A-t2", old_len=8, keep=list(range(8)), expect="A-t1"),
             computed=11, output=[9, 9])
    sched.on_new_request(a2)
    assert sched.get_num_new_matched_tokens(a2, 0) == (0, False)  # nothing to load: no wrong KV
    sched.update_state_after_alloc(a2, Blocks([0, 1, 5]), 0)
    assert sched.build_connector_meta(None).loads == []
    delay, reply = sched.request_finished(a2, [0, 1, 5])
    assert TurnReply.from_kv_transfer_params(reply) == TurnReply(pinned=11, recomputed=8)
    assert sched.pinned["A"].token_ids == a2.all_token_ids[:11]  # pinned again, going on


# ---- the admission rule (--kv-max-running): wait rather than drop idle pins --

def running_turn(sched, key, blocks):
    """Session `key`'s next turn, given `blocks` by the scheduler and running."""
    r = req(f"{key}-run", range(200, 200 + len(blocks) * BS - 2),
            TurnParams(key=key, turn=f"{key}-t9", old_len=0), computed=len(blocks) * BS - 1,
            output=[7])
    sched.on_new_request(r)
    assert sched.get_num_new_matched_tokens(r, 0) == (0, False)
    sched.update_state_after_alloc(r, Blocks(blocks), 0)
    sched.block_pool.touch([sched.block_pool.blocks[b] for b in blocks])
    return r


def newcomer(key):
    return req(f"{key}-1", range(300, 306), TurnParams(key=key, turn=f"{key}-t1", old_len=0,
                                                       name=f"s-{key}"))  # 8 tokens: 2 blocks


def test_a_turn_that_would_drop_idle_pins_waits_while_enough_turns_run():
    sched = capped(1)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    c = running_turn(sched, "C", [4])  # one session turn runs: the cap
    d = newcomer("D")
    sched.on_new_request(d)
    for _ in range(3):  # vLLM asks again every step; held, nothing dropped
        assert sched.get_num_new_matched_tokens(d, 0) == (None, False)
    assert set(sched.pinned) == {"A", "B"}
    assert sched.take_stats().data["turns_held"] == 1  # one turn held, however often asked
    sched.request_finished(c, [4])  # C's turn ends: fewer than the cap run
    sched.block_pool.free_blocks([sched.block_pool.blocks[4]])
    assert sched.get_num_new_matched_tokens(d, 0) == (0, False)
    assert set(sched.pinned) == {"B", "C"}  # then A, least recently used, goes as before


def test_without_the_rule_or_with_room_a_turn_runs_at_once():
    for max_running in (0, 1):
        sched = capped(max_running)
        pin(sched, "A", [0, 1], when=1.0)
        running_turn(sched, "C", [4])
        d = newcomer("D")
        sched.on_new_request(d)
        # three blocks free: D fits beside A's pins, whatever runs
        assert sched.get_num_new_matched_tokens(d, 0) == (0, False)
        assert set(sched.pinned) == {"A"}
    sched = capped(0)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    running_turn(sched, "C", [4])
    d = newcomer("D")
    sched.on_new_request(d)
    assert sched.get_num_new_matched_tokens(d, 0) == (0, False)  # off: A's pins go at once
    assert set(sched.pinned) == {"B"}


def test_a_turn_already_given_blocks_never_waits():
    """A preempted turn comes back through the waiting queue: holding it could
    leave every running slot held by turns that wait on each other."""
    sched = capped(1)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    c = running_turn(sched, "C", [4, 5])
    sched.block_pool.free_blocks([sched.block_pool.blocks[b] for b in (4, 5)])  # preempted
    pin(sched, "E", [4, 5], when=3.0)
    assert sched.get_num_new_matched_tokens(c, 0) == (0, False)
    assert "A" not in sched.pinned


def test_auto_gives_running_turns_half_the_pool():
    from sir_vllm.connector.admission import AdmissionRule, parse_max_running

    auto = AdmissionRule(parse_max_running("AUTO"))
    assert auto.cap(usable_blocks=943, turn_blocks=22) == 21  # issue 14's pool at 64 sessions
    assert auto.cap(usable_blocks=10, turn_blocks=50) == 1  # at least one turn runs
    assert AdmissionRule(parse_max_running("16")).cap(943, 22) == 16
    assert not AdmissionRule.from_extra_config({}).enabled
    for bad in ("-1", "half", "1.5"):
        with pytest.raises(ValueError, match="'auto' or an integer >= 0"):
            parse_max_running(bad)


# ---- through a real server with a three-block KV pool ----------------------

BLOCK_TOKENS = 128
# SmolLM2-135M in float32: 30 layers x 3 KV heads x 64 dims x (K, V) x 4 bytes per token.
BLOCK_BYTES = BLOCK_TOKENS * 30 * 3 * 64 * 2 * 4
POOL_BLOCKS = 4  # one of them is vLLM's null block: three usable


@pytest.fixture(scope="module")
def pool_server(bundled_model, tmp_path_factory):
    proc = started_server(bundled_model, tmp_path_factory.mktemp("pool-server"),
                          ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes",
                           str(POOL_BLOCKS * BLOCK_BYTES + BLOCK_BYTES // 2),
                           "--max-model-len", "256", *SESSION_POLICY_ARGS])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pool_client(pool_server):
    from openai import OpenAI

    return OpenAI(base_url=pool_server.url + "/v1", api_key="unused", timeout=300)


def turn(client, sid, prompt):
    return client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=8, temperature=0.0, logprobs=0,
        extra_body={"session_id": sid, "return_token_ids": True, "ignore_eos": True}).model_dump()


def test_a_full_pool_drops_the_lru_idle_session_and_keeps_serving(pool_client, pool_server):
    log = pool_server.log_path.read_text(errors="replace")
    assert f"KV cache size: {POOL_BLOCKS * BLOCK_TOKENS} tokens" in log, "the pool is not the size assumed"
    tag = uuid.uuid4().hex[:6]
    sid = {k: f"pool-{tag}-{k}" for k in "ABCD"}
    first = {k: turn(pool_client, sid[k], f"Session {k}: the secret word is {w}.")
             for k, w in zip("ABC", ("apple", "brick", "cloud"))}  # three pins fill the pool
    assert all(r["session"]["recomputed_tokens"] == 0 for r in first.values())
    d1 = turn(pool_client, sid["D"], "Session D: the secret word is delta.")  # drops A
    assert d1["session"]["turns"] == 1

    a2 = turn(pool_client, sid["A"], " What was the secret word?")  # A's pins are gone
    s = a2["session"]
    assert s["turns"] == 2 and s["recomputed_tokens"] == first["A"]["session"]["retained_tokens"] > 0
    assert s["loaded_tokens"] == 0
    # Recomputed from A's own ids: exactly what a stock request on that prompt gives.
    prompt, before = a2["choices"][0]["prompt_token_ids"], first["A"]["choices"][0]["prompt_token_ids"]
    assert prompt[: len(before)] == before
    plain = pool_client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=8, temperature=0.0, logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True}).model_dump()
    assert a2["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    diff = np.abs(np.array(a2["choices"][0]["logprobs"]["token_logprobs"])
                  - np.array(plain["choices"][0]["logprobs"]["token_logprobs"]))
    assert diff.max() < 1e-4, diff.max()

    d2 = turn(pool_client, sid["D"], " And yours?")  # the most recent session kept its KV
    assert d2["session"]["recomputed_tokens"] == 0
    assert d2["session"]["loaded_tokens"] == d1["session"]["retained_tokens"]

    log = pool_server.log_path.read_text(errors="replace")
    assert f"dropped the pinned KV of idle session {sid['A']!r}" in log
    assert log.count("dropped the pinned KV of idle session") >= 2
    assert f"session {sid['A']}: the engine no longer held its pinned KV" in log
    assert requests.get(pool_server.url + "/health", timeout=30).status_code == 200
