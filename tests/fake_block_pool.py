"""A stand-in for vLLM's block pool, for tests of the connector's scheduler role."""

from __future__ import annotations

from types import SimpleNamespace


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
