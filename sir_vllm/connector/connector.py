"""The KV connector vLLM loads for `--kv-policy`: one class, two roles kept apart."""

from __future__ import annotations

from typing import Any

from sir_vllm import vllm_adapter
from sir_vllm.connector.metrics import SirConnectorPromMetrics, SirConnectorStats
from sir_vllm.connector.scheduler import SessionScheduler
from sir_vllm.connector.worker import SessionWorker

KVConnectorBase_V1, _, KVConnectorRole = vllm_adapter.connector_base()


class SirKVConnector(KVConnectorBase_V1):
    """Session memory between requests: scheduler role pins and plans, worker role copies."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._scheduler = SessionScheduler(vllm_config) if role == KVConnectorRole.SCHEDULER else None
        self._worker = SessionWorker(vllm_config) if role == KVConnectorRole.WORKER else None

    # ---- worker role ----
    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    # ---- scheduler role ----
    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        self._scheduler.block_pool = gpu_block_pool

    def on_new_request(self, request) -> None:
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]):
        return self._scheduler.request_finished(request, block_ids)

    # ---- metrics (both roles; vLLM merges them per step: connector/metrics.py) ----
    def get_kv_connector_stats(self):
        return (self._scheduler or self._worker).take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return SirConnectorStats(data=data) if data is not None else SirConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return SirConnectorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
