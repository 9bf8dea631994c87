"""The per-step plan the scheduler role sends to the worker role (pickled)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sir_vllm import vllm_adapter
from sir_vllm.connector.offload import HostOp

_, KVConnectorMetadata, _ = vllm_adapter.connector_base()


@dataclass
class LoadJob:
    """Copy kept tokens of a session's pinned blocks into a new request's slots."""

    req_id: str
    src_slots: list[int]
    dst_slots: list[int]
    delta: list[int]  # new position - old position, per token


@dataclass
class SirConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    # the host tier's saves, restores and evictions (`connector.offload`), run
    # in this order before the loads: a save reads blocks the step reuses
    host_ops: list[HostOp] = field(default_factory=list)
