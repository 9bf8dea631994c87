"""The connector's scheduler role without an engine: pins, side-effect-free
matching, local prefix hits (DESIGN pitfalls 1, 4, 6)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from sir_vllm.connector.protocol import PARAMS_KEY, REPLY_KEY  # noqa: E402
from sir_vllm.connector.scheduler import SessionScheduler  # noqa: E402

from fake_block_pool import Pool  # noqa: E402

BS = 4


class FakeBlocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def request(rid, prompt, params, computed=0, output=(), max_tokens=0):
    """The fields of vLLM's `Request` the scheduler role reads (through vllm_adapter)."""
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(request_id=rid, prompt_token_ids=list(prompt),
                           num_prompt_tokens=len(prompt), max_tokens=max_tokens,
                           all_token_ids=list(prompt) + list(output), num_computed_tokens=computed,
                           kv_transfer_params={PARAMS_KEY: params}, skip_reading_prefix_cache=True,
                           status=RequestStatus.FINISHED_STOPPED)


@pytest.fixture
def sched():
    s = SessionScheduler(SimpleNamespace(cache_config=SimpleNamespace(block_size=BS)))
    s.block_pool = Pool(16)
    return s


def finish_first_turn(sched):
    # turn 1: 6 prompt tokens + 3 sampled -> 8 computed tokens in blocks 2, 3
    r1 = request("a", range(10, 16), {"id": "S", "old_len": 0, "keep": None}, computed=8, output=[16, 17, 18])
    sched.on_new_request(r1)
    assert r1.skip_reading_prefix_cache is False
    delay, reply = sched.request_finished(r1, [2, 3])
    assert (delay, reply) == (False, {REPLY_KEY: 8})
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [1, 1]


def test_kept_tokens_are_matched_without_side_effects(sched):
    finish_first_turn(sched)
    keep = [0, 1, 5, 7]  # old tokens 10, 11, 15, 17
    r2 = request("b", [10, 11, 15, 17, 18, 99], {"id": "S", "old_len": 8, "keep": keep})
    assert sched.get_num_new_matched_tokens(r2, 0) == (4, False)
    assert sched.get_num_new_matched_tokens(r2, 0) == (4, False)  # pitfall 6: repeatable
    assert sched.jobs == []
    sched.update_state_after_alloc(r2, FakeBlocks([7, 9]), 4)
    (job,) = sched.build_connector_meta(None).loads
    assert job.src_slots == [8, 9, 13, 15] and job.dst_slots == [28, 29, 30, 31]
    assert job.delta == [0, 0, -3, -4]


def test_local_prefix_hits_are_never_rewritten(sched):
    finish_first_turn(sched)
    r2 = request("b", [10, 11, 12, 13, 14, 15, 16, 17, 18, 99], {"id": "S", "old_len": 8, "keep": None})
    assert sched.get_num_new_matched_tokens(r2, 4) == (4, False)  # first block hit locally
    sched.update_state_after_alloc(r2, FakeBlocks([2, 5, 6]), 4)
    (job,) = sched.build_connector_meta(None).loads
    assert job.dst_slots == [20, 21, 22, 23] and job.src_slots == [12, 13, 14, 15]


def test_a_prompt_that_does_not_start_with_the_kept_tokens_is_recomputed(sched):
    finish_first_turn(sched)
    r2 = request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], {"id": "S", "old_len": 8, "keep": None})
    assert sched.get_num_new_matched_tokens(r2, 0) == (0, False)


def test_the_whole_prompt_is_never_claimed(sched):
    finish_first_turn(sched)  # pitfall 4: at least one token left to compute
    r2 = request("b", [10, 11, 12, 13, 14, 15, 16, 17], {"id": "S", "old_len": 8, "keep": None})
    assert sched.get_num_new_matched_tokens(r2, 0) == (0, False)


def test_the_next_turn_releases_the_old_pins(sched):
    finish_first_turn(sched)
    r2 = request("b", [10, 11, 12, 13, 14, 15, 16, 17, 18, 99], {"id": "S", "old_len": 8, "keep": None},
                 computed=10, output=[5])
    sched.request_finished(r2, [2, 3, 8])
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [1, 1]  # re-pinned by r2
    assert sched.block_pool.blocks[8].ref_cnt == 1
    drop = request("c", [1], {"id": "S", "drop": True})
    sched.on_new_request(drop)
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [0, 0] and "S" not in sched.pinned


def test_a_peek_loads_the_pins_and_changes_none(sched):
    finish_first_turn(sched)
    peek = request("p", [10, 11, 15, 17, 18, 99], {"id": "S", "old_len": 8, "keep": [0, 1, 5, 7],
                                                   "peek": True}, computed=6, output=[5])
    sched.on_new_request(peek)
    assert sched.get_num_new_matched_tokens(peek, 0) == (4, False)
    sched.update_state_after_alloc(peek, FakeBlocks([7, 9]), 4)
    assert len(sched.build_connector_meta(None).loads) == 1
    assert sched.request_finished(peek, [7, 9]) == (False, {REPLY_KEY: 6})
    assert sched.pinned["S"].block_ids == [2, 3] and sched.pinned["S"].token_ids == list(range(10, 18))
    assert [b.ref_cnt for b in sched.block_pool.blocks[2:4]] == [1, 1]
    assert [b.ref_cnt for b in sched.block_pool.blocks[7:10:2]] == [0, 0]
    assert "p" not in sched.active
