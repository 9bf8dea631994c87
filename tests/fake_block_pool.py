"""A stand-in for vLLM's block pool, and requests, for tests of the connector's scheduler role."""

from __future__ import annotations

from types import SimpleNamespace

from sir_vllm.connector.protocol import TurnParams, TurnReply
from sir_vllm.connector.scheduler import SessionScheduler


class Pool:
    """Block pool stand-in: a block is free when nothing references it."""

    def __init__(self, n):
        self.blocks = [SimpleNamespace(block_id=i, ref_cnt=0) for i in range(n)]
        self.num_gpu_blocks = n

    def touch(self, blocks):
        for b in blocks:
            b.ref_cnt += 1

    def free_blocks(self, blocks):
        for b in blocks:
            b.ref_cnt -= 1

    def get_num_free_blocks(self):
        return sum(b.ref_cnt == 0 for b in self.blocks)


BS = 4


class Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def req(rid, prompt, params=None, computed=0, output=(), max_tokens=2):
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(
        request_id=rid, prompt_token_ids=list(prompt), num_prompt_tokens=len(prompt),
        max_tokens=max_tokens, all_token_ids=list(prompt) + list(output),
        num_computed_tokens=computed, skip_reading_prefix_cache=False,
        kv_transfer_params=None if params is None else params.to_kv_transfer_params(),
        status=RequestStatus.FINISHED_STOPPED)


def capped(max_running):
    """The scheduler role on a six-block pool, with `--kv-max-running max_running`."""
    s = SessionScheduler(SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BS), model_config=SimpleNamespace(max_model_len=64),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"max_running": max_running})),
        install_utility=False)
    s.block_pool = Pool(6)
    return s


def pin(sched, key, blocks, when):
    """A finished first turn of session `key` whose KV fills `blocks`."""
    n = len(blocks) * BS
    r = req(f"{key}-1", range(100, 100 + n - 1),
            TurnParams(key=key, turn=f"{key}-t1", old_len=0, name=f"s-{key}"), computed=n, output=[7])
    sched.on_new_request(r)
    sched.update_state_after_alloc(r, Blocks(blocks), 0)
    assert sched.request_finished(r, blocks) == (False, TurnReply(pinned=n).to_kv_transfer_params())
    sched.pinned[key].last_used = when
