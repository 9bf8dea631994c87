"""Worker role (model-runner process): copy kept tokens into their new slots.

Runs in `start_load_kv`, before the forward pass of the step that schedules
the load. Keys are re-rotated by Δ = new position − old position (fp32); Δ = 0
tokens (sinks, untouched prefixes) are copied bit for bit. GPU layouts move all
layers in one fused launch (Triton on CUDA); the log line names the path taken.
Each job's time goes to vLLM's KV-connector stats (`connector.metrics`), from
the engine's first worker only, as `vllm:sir_compaction_seconds` on /metrics.
Under tensor parallelism every rank gets the same plan (slots and deltas are
per token, not per head) and applies it to its shard of the KV heads; the log
line names the rank, one line per rank and job.

The host tier's operations (`connector.offload`) run first, in the order the
scheduler planned them: saves of dropped pins into this rank's host store,
restores from it (timed like loads), evictions.
"""

from __future__ import annotations

import logging
import time

from sir_vllm import vllm_adapter
from sir_vllm.connector.metrics import CompactionTimer, SirConnectorStats, cuda_events
from sir_vllm.connector.offload import ForgetOp, MoveOp, RestoreOp, SaveOp
from sir_vllm.kv import copy_kept_tokens, layout_for
from sir_vllm.kv.offload import restore_tokens, save_tokens

logger = logging.getLogger("vllm.sir_vllm.connector")


class SessionWorker:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.kv_caches = None
        self.layout = None
        self._rope = None
        self.timer: CompactionTimer | None = None  # set once the caches (and ranks) are known
        self.tp_rank = 0
        self.host: dict[str, list] = {}  # session key -> its saved tokens, per layer (host tier)

    @property
    def rope(self):
        if self._rope is None:
            self._rope = vllm_adapter.rope_spec(self.vllm_config)
        return self._rope

    def register_kv_caches(self, kv_caches) -> None:
        self.kv_caches = kv_caches
        first = next(iter(kv_caches.values()))
        self.layout = layout_for(first, vllm_adapter.attention_backend_name(self.vllm_config))
        self.tp_rank = vllm_adapter.tensor_parallel_rank()
        if vllm_adapter.first_worker():
            self.timer = CompactionTimer(cuda_events(first.device))

    def run_host_ops(self, ops) -> None:
        for op in ops:
            if isinstance(op, SaveOp):
                self.host[op.key] = save_tokens(self.kv_caches, self.layout, op.src_slots)
            elif isinstance(op, ForgetOp):
                self.host.pop(op.key, None)
            elif isinstance(op, MoveOp):
                saved = self.host.pop(op.src, None)
                if saved is not None:
                    self.host[op.dst] = saved
            elif isinstance(op, RestoreOp):
                saved = self.host.get(op.key)
                if saved is None:  # the scheduler planned from an entry this rank never got
                    raise RuntimeError(f"sir-vllm: no host copy of session key {op.key} for "
                                       f"request {op.req_id}")
                timing = self.timer.start() if self.timer else None
                restore_tokens(self.kv_caches, self.layout, saved, op.index, op.dst_slots,
                               op.delta, self.rope)
                if self.timer:
                    self.timer.stop(timing, len(op.index))
                logger.info("sir-vllm: restored req=%s tokens=%d from host memory tp_rank=%d",
                            op.req_id, len(op.index), self.tp_rank)

    def start_load_kv(self, metadata) -> None:
        self.run_host_ops(getattr(metadata, "host_ops", ()))
        for job in getattr(metadata, "loads", ()):
            timing = self.timer.start() if self.timer else None
            t0 = time.perf_counter()
            path = copy_kept_tokens(self.kv_caches, self.layout, job.src_slots, job.dst_slots,
                                    job.delta, self.rope)
            if self.timer:
                self.timer.stop(timing, len(job.delta))
            ms = (time.perf_counter() - t0) * 1e3  # host time: a CUDA launch is asynchronous
            moved = sum(1 for d in job.delta if d)
            logger.info("sir-vllm: compaction req=%s tokens=%d rotated=%d ms=%.2f path=%s "
                        "tp_rank=%d", job.req_id, len(job.delta), moved, ms, path, self.tp_rank)

    def take_stats(self) -> SirConnectorStats | None:
        """The compactions since the last call (vLLM asks after every step)."""
        return self.timer.take() if self.timer else None
