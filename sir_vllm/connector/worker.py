"""Worker role (model-runner process): copy kept tokens into their new slots.

Runs in `start_load_kv`, before the forward pass of the step that schedules
the load. Keys are re-rotated by Δ = new position − old position (fp32); Δ = 0
tokens (sinks, untouched prefixes) are copied bit for bit.
"""

from __future__ import annotations

import logging
import time

from sir_vllm import vllm_adapter
from sir_vllm.kv import copy_kept_tokens, layout_for

logger = logging.getLogger("vllm.sir_vllm.connector")


class SessionWorker:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.kv_caches = None
        self.layout = None
        self._rope = None

    @property
    def rope(self):
        if self._rope is None:
            self._rope = vllm_adapter.rope_spec(self.vllm_config)
        return self._rope

    def register_kv_caches(self, kv_caches) -> None:
        self.kv_caches = kv_caches
        first = next(iter(kv_caches.values()))
        self.layout = layout_for(first, vllm_adapter.attention_backend_name(self.vllm_config))

    def start_load_kv(self, metadata) -> None:
        for job in getattr(metadata, "loads", ()):
            t0 = time.perf_counter()
            copy_kept_tokens(self.kv_caches, self.layout, job.src_slots, job.dst_slots,
                             job.delta, self.rope)
            ms = (time.perf_counter() - t0) * 1e3
            moved = sum(1 for d in job.delta if d)
            logger.info("sir-vllm: compaction req=%s tokens=%d rotated=%d ms=%.2f",
                        job.req_id, len(job.delta), moved, ms)
