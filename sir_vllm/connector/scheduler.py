"""Scheduler role (EngineCore process): pin each session's last turn, plan the next load.

A finished session turn keeps its blocks (ref count +1, `block_pool.touch`).
The session's next request reports the kept tokens as externally matched and
the worker copies them, re-rotated, into the request's first slots. The old
pins are released when that next turn finishes and pins its own blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sir_vllm import vllm_adapter
from sir_vllm.connector.metadata import LoadJob, SirConnectorMetadata
from sir_vllm.connector.protocol import DROP_KEY, PARAMS_KEY, REPLY_KEY, keep_list

logger = logging.getLogger("vllm.sir_vllm.connector")


@dataclass
class Pinned:
    block_ids: list[int]
    token_ids: list[int]  # the tokens whose KV the blocks hold, position = index


@dataclass
class PlannedLoad:
    session: str
    src_positions: list[int]  # old cache indices
    start: int  # first new position to fill (local prefix hits cover the rest)


def slots(block_ids: list[int], positions, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in positions]


class SessionScheduler:
    def __init__(self, vllm_config):
        self.block_size = vllm_adapter.block_size(vllm_config)
        self.block_pool = None
        self.pinned: dict[str, Pinned] = {}
        self.planned: dict[str, PlannedLoad] = {}
        self.jobs: list[LoadJob] = []

    # -- helpers --------------------------------------------------------
    @staticmethod
    def params(request) -> dict | None:
        p = vllm_adapter.request_params(request)
        return p.get(PARAMS_KEY) if isinstance(p, dict) else None

    def _usable_keep(self, request, p) -> list[int] | None:
        """The keep list if the pinned blocks hold exactly what the API expects."""
        pin = self.pinned.get(p["id"])
        if pin is None or len(pin.token_ids) != int(p["old_len"]):
            return None
        keep = keep_list(p)
        prompt = request.prompt_token_ids or []
        if len(keep) >= len(prompt) or [pin.token_ids[i] for i in keep] != list(prompt[: len(keep)]):
            logger.warning("sir-vllm: session %s: prompt does not start with the kept tokens; "
                           "recomputing", p["id"])
            return None
        return keep

    def _release(self, session: str) -> None:
        pin = self.pinned.pop(session, None)
        if pin is not None and self.block_pool is not None:
            self.block_pool.free_blocks(vllm_adapter.pool_blocks(self.block_pool, pin.block_ids))

    # -- connector API --------------------------------------------------
    def on_new_request(self, request) -> None:
        p = self.params(request)
        if p is None:
            return
        vllm_adapter.allow_connector_hits(request)
        if p.get(DROP_KEY):
            self._release(p["id"])

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        p = self.params(request)
        if p is None or p.get(DROP_KEY):
            return 0, False
        keep = self._usable_keep(request, p)
        if not keep:
            return 0, False
        return max(0, len(keep) - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        p = self.params(request)
        keep = self._usable_keep(request, p)
        assert keep is not None, "a load was granted for a session whose pins changed"
        start = len(keep) - num_external_tokens  # pitfall 1: never rewrite local hits
        new_blocks = vllm_adapter.block_table(blocks)
        pin = self.pinned[p["id"]]
        src = keep[start:]
        dst = list(range(start, len(keep)))
        self.jobs.append(LoadJob(
            req_id=request.request_id,
            src_slots=slots(pin.block_ids, src, self.block_size),
            dst_slots=slots(new_blocks, dst, self.block_size),
            delta=[d - s for s, d in zip(src, dst)],
        ))

    def build_connector_meta(self, scheduler_output) -> SirConnectorMetadata:
        meta = SirConnectorMetadata(loads=self.jobs)
        self.jobs = []
        return meta

    def request_finished(self, request, block_ids: list[int]):
        p = self.params(request)
        if p is None or p.get(DROP_KEY):
            return False, None
        if not vllm_adapter.finished_ok(request):
            return False, None  # the API keeps the session as before this turn
        num = int(request.num_computed_tokens)
        need = -(-num // self.block_size)
        block_ids = list(block_ids[:need])
        self.block_pool.touch(vllm_adapter.pool_blocks(self.block_pool, block_ids))
        self._release(p["id"])
        self.pinned[p["id"]] = Pinned(block_ids, vllm_adapter.computed_token_ids(request, num))
        return False, {REPLY_KEY: num}
