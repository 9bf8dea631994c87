"""The connector's scheduler role without an engine: pins, side-effect-free
matching, local prefix hits (DESIGN pitfalls 1, 4, 6)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from sir_vllm.connector.protocol import (ENGINE_UTILITY, EngineQuery, TurnParams,  # noqa: E402
                                         TurnReply)
from sir_vllm.connector.scheduler import SessionScheduler  # noqa: E402

from fake_block_pool import Blocks as FakeBlocks, Pool  # noqa: E402

BS = 4


def turn(old_len, keep=None, expect="t1", turn_id="t2", peek=False, key="S"):
    return TurnParams(key=key, turn=turn_id, old_len=old_len, keep=keep, expect=expect, peek=peek)


def request(rid, prompt, params: TurnParams, computed=0, output=(), max_tokens=0):
    """The fields of vLLM's `Request` the scheduler role reads (through vllm_adapter)."""
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(request_id=rid, prompt_token_ids=list(prompt),
                           num_prompt_tokens=len(prompt), max_tokens=max_tokens,
                           all_token_ids=list(prompt) + list(output), num_computed_tokens=computed,
                           kv_transfer_params=params.to_kv_transfer_params(),
                           skip_reading_prefix_cache=True, status=RequestStatus.FINISHED_STOPPED)


@pytest.fixture
def sched():
    s = SessionScheduler(SimpleNamespace(cache_config=SimpleNamespace(block_size=BS)),
                         install_utility=False)
    s.block_pool = Pool(16)
    return s


def finish_first_turn(sched):
    # turn 1: 6 prompt tokens + 3 sampled -> 8 computed tokens in blocks 2, 3
    r1 = request("a", range(10, 16), turn(0, expect=None, turn_id="t1"), computed=8,
                 output=[16, 17, 18])
    sched.on_new_request(r1)
    assert r1.skip_reading_prefix_cache is False
    delay, reply = sched.request_finished(r1, [2, 3])
    assert (delay, TurnReply.from_kv_transfer_params(reply)) == (False, TurnReply(pinned=8))
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [1, 1]


def test_kept_tokens_are_matched_without_side_effects(sched):
    finish_first_turn(sched)
    keep = [0, 1, 5, 7]  # old tokens 10, 11, 15, 17
    r2 = request("b", [10, 11, 15, 17, 18, 99], turn(8, keep))
    assert sched.get_num_new_matched_tokens(r2, 0) == (4, False)
    assert sched.get_num_new_matched_tokens(r2, 0) == (4, False)  # pitfall 6: repeatable
    assert sched.jobs == []
    sched.update_state_after_alloc(r2, FakeBlocks([7, 9]), 4)
    (job,) = sched.build_connector_meta(None).loads
    assert job.src_slots == [8, 9, 13, 15] and job.dst_slots == [28, 29, 30, 31]
    assert job.delta == [0, 0, -3, -4]


def test_local_prefix_hits_are_never_rewritten(sched):
    finish_first_turn(sched)
    r2 = request("b", [10, 11, 12, 13, 14, 15, 16, 17, 18, 99], turn(8))
    assert sched.get_num_new_matched_tokens(r2, 4) == (4, False)  # first block hit locally
    sched.update_state_after_alloc(r2, FakeBlocks([2, 5, 6]), 4)
    (job,) = sched.build_connector_meta(None).loads
    assert job.dst_slots == [20, 21, 22, 23] and job.src_slots == [12, 13, 14, 15]


def test_a_prompt_that_does_not_start_with_the_kept_tokens_is_recomputed(sched):
    finish_first_turn(sched)
    r2 = request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], turn(8))
    assert sched.get_num_new_matched_tokens(r2, 0) == (0, False)


def test_the_whole_prompt_is_never_claimed(sched):
    finish_first_turn(sched)  # pitfall 4: at least one token left to compute
    r2 = request("b", [10, 11, 12, 13, 14, 15, 16, 17], turn(8))
    assert sched.get_num_new_matched_tokens(r2, 0) == (0, False)


def test_the_next_turn_releases_the_old_pins(sched):
    finish_first_turn(sched)
    r2 = request("b", [10, 11, 12, 13, 14, 15, 16, 17, 18, 99], turn(8),
                 computed=10, output=[5])
    sched.request_finished(r2, [2, 3, 8])
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [1, 1]  # re-pinned by r2
    assert sched.block_pool.blocks[8].ref_cnt == 1
    assert sched.pinned["S"].turn == "t2"
    assert sched.handle_query(EngineQuery.DROP, ["S", "unknown"]) == 1  # no request, no forward pass
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [0, 0] and "S" not in sched.pinned
    assert sched.block_pool.blocks[8].ref_cnt == 0


def test_pins_left_by_another_turn_are_never_loaded(sched):
    """A rolled-back state (or another API process's) expects a turn the pins
    do not carry: the kept tokens are recomputed, however alike the ids look."""
    finish_first_turn(sched)
    same_ids = [10, 11, 12, 13, 14, 15, 16, 17, 18, 99]
    stale = request("b", same_ids, turn(8, expect="t0"))
    assert sched.get_num_new_matched_tokens(stale, 0) == (0, False)
    none = request("c", same_ids, turn(8, expect=None))
    assert sched.get_num_new_matched_tokens(none, 0) == (0, False)
    sched.update_state_after_alloc(stale, FakeBlocks([5, 6, 7]), 0)
    assert sched.recomputed["b"] == 8 and sched.build_connector_meta(None).loads == []


def test_a_replayed_turn_takes_the_shared_prefix_in_place(sched):
    """Regenerate: the session rolled back one turn and sends the same turn
    again; the pins of the first attempt hold its prompt's KV exactly."""
    finish_first_turn(sched)
    keep = [0, 1, 5, 7]
    prompt = [10, 11, 15, 17, 18, 99]
    first = request("b", prompt, turn(8, keep, turn_id="t2"), computed=8, output=[41, 42, 43])
    sched.update_state_after_alloc(first, FakeBlocks([7, 9]), 0)
    sched.request_finished(first, [7, 9])
    again = request("c", prompt, turn(8, keep, turn_id="t3"))  # expects t1: the pins are t2's
    assert sched.get_num_new_matched_tokens(again, 0) == (5, False)  # all but one prompt token
    sched.update_state_after_alloc(again, FakeBlocks([10, 11]), 5)
    (job,) = sched.build_connector_meta(None).loads
    assert job.src_slots == [28, 29, 30, 31, 36] and job.dst_slots == [40, 41, 42, 43, 44]
    assert job.delta == [0] * 5 and sched.recomputed["c"] == 0
    other = request("d", prompt, turn(8, [0, 1, 5, 6], turn_id="t4"))  # another keep: no reuse
    assert sched.get_num_new_matched_tokens(other, 0) == (0, False)


def test_a_turns_reply_can_be_fetched_once_and_stats_count_pins(sched):
    finish_first_turn(sched)
    assert sched.handle_query(EngineQuery.REPLY, "t1") == {"pinned": 8, "recomputed": 0}
    assert sched.handle_query(EngineQuery.REPLY, "t1") is None
    stats = sched.handle_query(EngineQuery.STATS)
    assert stats["pinned_sessions"] == 1 and stats["pinned_blocks"] == 2
    assert stats["free_blocks"] == 14 and stats["total_blocks"] == 16


def test_the_engine_utility_takes_vllms_own_dispatch():
    """vLLM matches a utility call's arguments to the method's signature
    (`EngineCore._convert_msgspec_args`) before calling it by name."""
    import types

    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    from sir_vllm import vllm_adapter

    calls = []
    vllm_adapter.install_engine_utility(ENGINE_UTILITY, lambda c, a: calls.append((c, a)) or 7)
    method = types.MethodType(getattr(EngineCore, ENGINE_UTILITY), object())
    args = EngineCoreProc._convert_msgspec_args(method, (EngineQuery.DROP, ["k"]))
    assert method(*args) == 7 and calls == [(EngineQuery.DROP, ["k"])]


def test_a_peek_loads_the_pins_and_changes_none(sched):
    finish_first_turn(sched)
    peek = request("p", [10, 11, 15, 17, 18, 99], turn(8, [0, 1, 5, 7], peek=True), computed=6,
                   output=[5])
    sched.on_new_request(peek)
    assert sched.get_num_new_matched_tokens(peek, 0) == (4, False)
    sched.update_state_after_alloc(peek, FakeBlocks([7, 9]), 4)
    assert len(sched.build_connector_meta(None).loads) == 1
    assert sched.request_finished(peek, [7, 9]) == (False, TurnReply(pinned=0).to_kv_transfer_params())
    assert sched.pinned["S"].block_ids == [2, 3] and sched.pinned["S"].token_ids == list(range(10, 18))
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [1, 1]
    assert [b.ref_cnt for b in sched.block_pool.blocks[7:10:2]] == [0, 0]
    assert "p" not in sched.active
