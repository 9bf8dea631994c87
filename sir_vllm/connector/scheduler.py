"""Scheduler role (EngineCore process): pin each session's last turn, plan the next load.

A finished session turn keeps its blocks (ref count +1, `block_pool.touch`).
The session's next request reports the kept tokens as externally matched and
the worker copies them, re-rotated, into the request's first slots. The old
pins are released when that next turn finishes and pins its own blocks. A
peek (`"peek": true`) loads the same way and changes no pin when it finishes.

Pins of idle sessions hold pool blocks. When a request arrives that the free
blocks cannot hold (`get_num_new_matched_tokens`, called for every request the
scheduler tries to admit, session or not), the least recently used *idle*
sessions (no request of theirs in the engine) lose their pins until it fits,
each with a log line. A dropped session's next turn finds no pins: its kept
tokens are recomputed from their token ids (the prompt always carries them),
and the reply says how many (`RECOMPUTED_KEY`). Never another session's KV:
pins are keyed by the session's own key and blocks are salted per session.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sir_vllm import vllm_adapter
from sir_vllm.connector.metadata import LoadJob, SirConnectorMetadata
from sir_vllm.connector.protocol import (DROP_KEY, PARAMS_KEY, PEEK_KEY, RECOMPUTED_KEY, REPLY_KEY,
                                         keep_list)

logger = logging.getLogger("vllm.sir_vllm.connector")


@dataclass
class Pinned:
    block_ids: list[int]
    token_ids: list[int]  # the tokens whose KV the blocks hold, position = index
    last_used: float = field(default_factory=time.monotonic)  # LRU order among idle sessions
    name: str = ""  # the client's session id, for log lines


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
        self.active: dict[str, str] = {}  # request id -> session key, requests in the engine
        self.recomputed: dict[str, int] = {}  # request id -> kept tokens found unpinned
        self.dropped_total = 0
        self.max_model_len, self.watermark = vllm_adapter.scheduler_limits(vllm_config)

    # -- helpers --------------------------------------------------------
    @staticmethod
    def params(request) -> dict | None:
        p = vllm_adapter.request_params(request)
        return p.get(PARAMS_KEY) if isinstance(p, dict) else None

    def _usable_keep(self, request, p, quiet: bool = False) -> list[int] | None:
        """The keep list if the pinned blocks hold exactly what the API expects."""
        pin = self.pinned.get(p["id"])
        if pin is None or len(pin.token_ids) != int(p["old_len"]):
            return None
        keep = keep_list(p)
        prompt = vllm_adapter.prompt_token_ids(request)
        if len(keep) >= len(prompt) or [pin.token_ids[i] for i in keep] != prompt[: len(keep)]:
            if not quiet:
                logger.warning("sir-vllm: session %s: prompt does not start with the kept tokens; "
                               "recomputing", p["id"])
            return None
        return keep

    def _release(self, session: str) -> None:
        pin = self.pinned.pop(session, None)
        if pin is not None and self.block_pool is not None:
            vllm_adapter.unpin_blocks(self.block_pool, pin.block_ids)

    # -- LRU dropping of idle sessions' pins -----------------------------
    def _blocks_needed(self, request, num_computed_tokens: int) -> int:
        """New blocks the request takes for its whole sequence (prompt + max_tokens)."""
        total = vllm_adapter.tokens_to_hold(request)
        if self.max_model_len:
            total = min(total, self.max_model_len)
        need = -(-total // self.block_size) - num_computed_tokens // self.block_size
        return max(need, 1) + int(self.watermark * vllm_adapter.pool_size(self.block_pool))

    def _make_room(self, request, num_computed_tokens: int) -> None:
        """Drop the pins of least recently used idle sessions until the free
        blocks can hold `request` (or no idle session is left)."""
        if not self.pinned or self.block_pool is None:
            return
        free = vllm_adapter.free_block_count(self.block_pool)
        if free is None:
            return
        need = self._blocks_needed(request, num_computed_tokens)
        if free >= need:
            return
        busy = set(self.active.values())
        idle = sorted((pin.last_used, key) for key, pin in self.pinned.items() if key not in busy)
        now = time.monotonic()
        for last_used, key in idle:
            if free >= need:
                break
            blocks, name = len(self.pinned[key].block_ids), self.pinned[key].name
            self._release(key)
            self.dropped_total += 1
            logger.warning(
                "sir-vllm: KV pool full (%d free blocks, request %s needs %d): dropped the pinned KV "
                "of idle session %r (key %s, %d blocks, idle %.1fs, least recently used); its next "
                "turn recomputes its kept tokens", free, vllm_adapter.request_id(request), need, name, key, blocks,
                now - last_used)
            free = vllm_adapter.free_block_count(self.block_pool)

    # -- connector API --------------------------------------------------
    def on_new_request(self, request) -> None:
        p = self.params(request)
        if p is None:
            return
        vllm_adapter.allow_connector_hits(request)
        if p.get(DROP_KEY):
            self._release(p["id"])
            return
        self.active[vllm_adapter.request_id(request)] = p["id"]  # not idle: its pins are never dropped
        pin = self.pinned.get(p["id"])
        if pin is not None:
            pin.last_used = time.monotonic()

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        # The one side effect (pitfall 6 allows no other): free idle sessions'
        # pins when the pool cannot hold this request; repeating it is harmless.
        self._make_room(request, num_computed_tokens)
        p = self.params(request)
        if p is None or p.get(DROP_KEY):
            return 0, False
        keep = self._usable_keep(request, p)
        if not keep:
            return 0, False
        return max(0, len(keep) - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        p = self.params(request)
        if p is None or p.get(DROP_KEY):
            return
        keep = self._usable_keep(request, p, quiet=True)
        expected = len(keep_list(p))
        self.recomputed[vllm_adapter.request_id(request)] = 0 if keep else expected
        if num_external_tokens <= 0:
            return
        assert keep is not None, "a load was granted for a session whose pins changed"
        start = len(keep) - num_external_tokens  # pitfall 1: never rewrite local hits
        new_blocks = vllm_adapter.block_table(blocks)
        pin = self.pinned[p["id"]]
        src = keep[start:]
        dst = list(range(start, len(keep)))
        self.jobs.append(LoadJob(
            req_id=vllm_adapter.request_id(request),
            src_slots=slots(pin.block_ids, src, self.block_size),
            dst_slots=slots(new_blocks, dst, self.block_size),
            delta=[d - s for s, d in zip(src, dst)],
        ))

    def build_connector_meta(self, scheduler_output) -> SirConnectorMetadata:
        meta = SirConnectorMetadata(loads=self.jobs)
        self.jobs = []
        return meta

    def request_finished(self, request, block_ids: list[int]):
        rid = vllm_adapter.request_id(request)
        self.active.pop(rid, None)
        recomputed = self.recomputed.pop(rid, None)
        p = self.params(request)
        if p is None or p.get(DROP_KEY):
            return False, None
        if not vllm_adapter.finished_ok(request):
            return False, None  # the API keeps the session as before this turn
        num = vllm_adapter.num_computed_tokens(request)
        if not p.get(PEEK_KEY):
            need = -(-num // self.block_size)
            block_ids = list(block_ids[:need])
            vllm_adapter.pin_blocks(self.block_pool, block_ids)
            self._release(p["id"])
            self.pinned[p["id"]] = Pinned(block_ids, vllm_adapter.computed_token_ids(request, num),
                                          name=str(p.get("name", "")))
        reply = {REPLY_KEY: num}
        if recomputed:
            reply[RECOMPUTED_KEY] = recomputed
        return False, reply
