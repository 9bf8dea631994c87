"""Scheduler role (EngineCore process): pin each session's last turn, plan the next load.

A finished session turn keeps its blocks (ref count +1, `block_pool.touch`),
tagged with the turn's id. The session's next request names that id
(`TurnParams.expect`); if the pins carry it, the kept tokens are reported as
externally matched and the worker copies them, re-rotated, into the request's
first slots. The old pins are released when that next turn finishes and pins
its own blocks. A peek loads the same way and changes no pin when it finishes.
A turn that starts where the pinned one started (a regenerated answer: the
session rolled back one turn) takes the prompt prefix the two share from the
pins as they are (or from their saved copy in the host tier), so it sees
exactly the KV the first attempt saw.

Pins of idle sessions hold pool blocks. When a request arrives that the free
blocks cannot hold (`get_num_new_matched_tokens`, called for every request the
scheduler tries to admit, session or not), the least recently used *idle*
sessions (no request of theirs in the engine) lose their pins until it fits,
each with a log line. Pins of sessions whose next request waits in the
engine stay, unless a request could never be allocated while they do (its
own session's pins fill the pool, or several waiting sessions' do): then
those go too, this request's own first, or it would wait forever. With
`--kv-max-running` (`connector.admission`), a session turn that would drop
idle sessions' pins waits instead while enough session turns run. With
`--kv-offload-bytes` (`connector.offload`), dropped pins are first saved to
host memory and the session's next turn copies its kept tokens back from
there. Otherwise a dropped session's next turn finds no pins: its kept
tokens are recomputed from their token ids (the prompt always carries them),
and the reply says how many (`TurnReply.recomputed`). Never another session's
KV: pins are keyed by the session's own key and tagged by turn, and blocks are
salted per session.

The API process reaches this role without a request through the engine
utility (`handle_query`): dropping a deleted or expired session's pins costs
no forward pass. Pins dropped for pool pressure and kept tokens recomputed go
to vLLM's KV-connector stats (`take_stats`, `connector.metrics`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from sir_vllm import vllm_adapter
from sir_vllm.connector.admission import AdmissionRule
from sir_vllm.connector.metadata import LoadJob, SirConnectorMetadata
from sir_vllm.connector.metrics import SirConnectorStats
from sir_vllm.connector.offload import HostIndex, Offloaded
from sir_vllm.connector.protocol import (ENGINE_UTILITY, EngineQuery, PoolStats, TurnParams,
                                         TurnReply)

logger = logging.getLogger("vllm.sir_vllm.connector")

MAX_REPLIES = 4096  # replies kept for streaming turns to fetch (oldest forgotten first)


@dataclass
class Pinned:
    block_ids: list[int]
    token_ids: list[int]  # the tokens whose KV the blocks hold, position = index
    turn: str  # the turn id that left these pins
    origin: tuple | None = None  # (expect, old_len, keep) of the turn that left them
    last_used: float = field(default_factory=time.monotonic)  # LRU order among idle sessions
    name: str = ""  # the client's session id, for log lines


def origin_of(p: TurnParams) -> tuple | None:
    """What a turn started from: the state it expected pinned and its keep set.
    Two turns with one origin share the KV of their common prompt prefix."""
    if p.expect is None:
        return None
    return (p.load_key, p.expect, p.old_len, None if p.keep is None else tuple(p.keep))


def slots(block_ids: list[int], positions, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in positions]


class SessionScheduler:
    def __init__(self, vllm_config, install_utility: bool = True):
        self.block_size = vllm_adapter.block_size(vllm_config)
        self.block_pool = None
        self.pinned: dict[str, Pinned] = {}
        self.jobs: list[LoadJob] = []
        self.active: dict[str, tuple[str, str]] = {}  # request id -> (key, load key), in the engine
        self.allocated: set[str] = set()  # request ids the scheduler has given blocks
        self.recomputed: dict[str, int] = {}  # request id -> kept tokens found unpinned
        self.replies: OrderedDict[str, TurnReply] = OrderedDict()  # turn id -> reply
        self.dropped_total = 0
        self.events = SirConnectorStats()  # this step's pins dropped and tokens recomputed
        self.max_model_len, self.watermark = vllm_adapter.scheduler_limits(vllm_config)
        extra = vllm_adapter.connector_extra_config(vllm_config)
        self.admission = AdmissionRule.from_extra_config(extra)
        self.host = HostIndex.from_config(extra, lambda: vllm_adapter.kv_bytes_per_token(vllm_config))
        self.held: set[str] = set()  # request ids the admission rule has held back
        if install_utility:
            vllm_adapter.install_engine_utility(ENGINE_UTILITY, self.handle_query)

    # -- helpers --------------------------------------------------------
    @staticmethod
    def params(request) -> TurnParams | None:
        return TurnParams.from_kv_transfer_params(vllm_adapter.request_params(request))

    def _sources(self, request, p: TurnParams, quiet: bool = False) -> list[int] | None:
        """Positions in the pinned blocks whose KV the request's first tokens take
        (token i from position sources[i]), or None when the pins cannot serve it."""
        return self._sources_in(self.pinned.get(p.load_key), request, p, quiet)

    def _offloaded_sources(self, request, p: TurnParams) -> list[int] | None:
        """The same, from the host tier's copy of the state (its pins were
        dropped for pool pressure and saved)."""
        return self._sources_in(self.host.get(p.load_key), request, p, True)

    def _sources_in(self, state: Pinned | Offloaded | None, request, p: TurnParams,
                    quiet: bool) -> list[int] | None:
        """Positions in `state` (pins or their saved copy) the request's first tokens take.

        Two ways: the state is the one the turn starts from (`expect`): its
        kept tokens, re-rotated to their new places; or it was left by a turn
        with the same origin (a regenerated answer rolls back one turn and
        replays it): the prompt prefix the two share, in place (Δ = 0), exactly
        the KV the first one computed."""
        if state is None or p.expect is None:
            return None
        prompt = vllm_adapter.prompt_token_ids(request)
        if state.turn == p.expect and len(state.token_ids) == p.old_len:
            return self._kept_prefix(state.token_ids, p, prompt, quiet)
        if state.origin is not None and state.origin == origin_of(p):
            limit = min(len(prompt) - 1, len(state.token_ids))  # pitfall 4: one token to compute
            shared = next((i for i in range(limit) if state.token_ids[i] != prompt[i]), limit)
            return list(range(shared)) if shared else None
        return None

    @staticmethod
    def _kept_prefix(token_ids: list[int], p: TurnParams, prompt: list[int],
                     quiet: bool = False) -> list[int] | None:
        """The keep set, when the prompt starts with those tokens of the saved state."""
        keep = p.keep_indices()
        if len(keep) < len(prompt) and [token_ids[i] for i in keep] == prompt[: len(keep)]:
            return keep
        if not quiet:
            logger.warning("sir-vllm: session %s: prompt does not start with the kept tokens; "
                           "recomputing", p.name or p.key)
        return None

    def _release(self, session: str) -> bool:
        pin = self.pinned.pop(session, None)
        if pin is not None and self.block_pool is not None:
            vllm_adapter.unpin_blocks(self.block_pool, pin.block_ids)
        return pin is not None

    def _remember_reply(self, turn: str, reply: TurnReply) -> None:
        self.replies[turn] = reply
        while len(self.replies) > MAX_REPLIES:
            self.replies.popitem(last=False)

    # -- LRU dropping of idle sessions' pins -----------------------------
    def _busy_keys(self) -> set[str]:
        """Pin keys a request in the engine owns or loads from (never idle)."""
        return {key for keys in self.active.values() for key in keys}

    def _new_blocks(self, tokens: int, num_computed_tokens: int) -> int:
        """Blocks beyond the computed ones that `tokens` tokens of a request take."""
        if self.max_model_len:
            tokens = min(tokens, self.max_model_len)
        return max(-(-tokens // self.block_size) - num_computed_tokens // self.block_size, 1)

    def _blocks_needed(self, request, num_computed_tokens: int) -> int:
        """New blocks the request takes for its whole sequence (prompt + max_tokens)."""
        return (self._new_blocks(vllm_adapter.tokens_to_hold(request), num_computed_tokens)
                + int(self.watermark * vllm_adapter.pool_size(self.block_pool)))

    def _blocks_now(self, request, num_computed_tokens: int) -> int:
        """New blocks the request takes to be scheduled now (its prompt)."""
        return self._new_blocks(vllm_adapter.prompt_length(request), num_computed_tokens)

    def _drop(self, key: str, request, free: int, need: int, why: str) -> int:
        """Release `key`'s pins for `request` (a log line); the free blocks after."""
        pin = self.pinned[key]
        saved = self.host.save(key, Offloaded(pin.token_ids, pin.turn, pin.name, pin.origin),
                               slots(pin.block_ids, range(len(pin.token_ids)), self.block_size))
        self._release(key)
        self.dropped_total += 1
        self.events.record_pins_dropped()
        if saved:
            self.events.record_offloaded(len(pin.token_ids))
        logger.warning(
            "sir-vllm: KV pool full (%d free blocks, request %s needs %d): dropped the pinned KV "
            "of %s session %r (key %s, %d blocks, unused %.1fs); %s", free,
            vllm_adapter.request_id(request), need, why, pin.name, key, len(pin.block_ids),
            time.monotonic() - pin.last_used,
            "saved to host memory, its next turn copies its kept tokens back" if saved
            else "its next turn recomputes its kept tokens")
        return vllm_adapter.free_block_count(self.block_pool)

    def _make_room(self, request, num_computed_tokens: int) -> None:
        """Drop the pins of least recently used idle sessions until the free
        blocks can hold `request` (or no idle session is left). Then, if the
        pins of sessions with a request in the engine leave too few blocks for
        `request` ever to be scheduled, drop those of requests not yet given
        blocks (this one's own first, then least recently used): waiting for
        them would never end."""
        if not self.pinned or self.block_pool is None:
            return
        free = vllm_adapter.free_block_count(self.block_pool)
        if free is None:
            return
        need = self._blocks_needed(request, num_computed_tokens)
        if free >= need:
            return
        busy = self._busy_keys()
        idle = sorted((pin.last_used, key) for key, pin in self.pinned.items() if key not in busy)
        for _, key in idle:
            if free >= need:
                return
            free = self._drop(key, request, free, need, "idle")  # least recently used first
        now = self._blocks_now(request, num_computed_tokens)
        usable = vllm_adapter.usable_block_count(self.block_pool)
        own = set(self.active.get(vllm_adapter.request_id(request), ()))
        running = {key for rid, keys in self.active.items() if rid in self.allocated
                   for key in keys} - own
        # the pins that stay until a request not yet given blocks runs (a
        # running request's pins turn idle, so droppable, when it finishes)
        stuck = sorted((key not in own, self.pinned[key].last_used, key)
                       for key in busy - running if key in self.pinned)
        for i, (_, _, key) in enumerate(stuck):
            held = {b for _, _, k in stuck[i:] for b in self.pinned[k].block_ids}
            if free >= now or usable - len(held) >= now:
                return  # fits now, or once the running requests finish
            free = self._drop(key, request, free, now, "waiting")

    def _must_wait(self, request, num_computed_tokens: int) -> bool:
        """The admission rule (`connector.admission`): hold a session turn not yet
        given blocks that would drop idle sessions' pins while enough turns run."""
        rid = vllm_adapter.request_id(request)
        if (not self.admission.enabled or self.block_pool is None or self.params(request) is None
                or rid in self.allocated):
            return False
        free = vllm_adapter.free_block_count(self.block_pool)
        if free is None:
            return False
        busy = self._busy_keys()
        wait = self.admission.must_wait(
            running=len(self.allocated), free_blocks=free,
            need_blocks=self._blocks_needed(request, num_computed_tokens),
            idle_pins=any(key not in busy for key in self.pinned),
            usable_blocks=vllm_adapter.usable_block_count(self.block_pool),
            turn_blocks=self._new_blocks(vllm_adapter.tokens_to_hold(request), num_computed_tokens))
        if wait and rid not in self.held:
            self.held.add(rid)
            self.events.record_turn_held()
        return wait

    # -- the engine utility (API process -> EngineCore, no request) -------
    def handle_query(self, command: str, argument=None):
        if command == EngineQuery.DROP:
            return sum(self._release(str(key)) | self.host.forget(str(key)) for key in argument or ())
        if command == EngineQuery.MOVE:
            src, dst = (str(k) for k in argument)
            pin = self.pinned.pop(src, None)
            if pin is None:  # dropped for pool pressure: its saved copy, if any, moves
                return self.host.move(src, dst)
            for key in (src, dst):  # copies of older states than the pins'
                self.host.forget(key)
            self._release(dst)
            self.pinned[dst] = pin
            return True
        if command == EngineQuery.REPLY:
            reply = self.replies.pop(str(argument), None)
            return None if reply is None else asdict(reply)
        if command == EngineQuery.STATS:
            return asdict(self.stats())
        raise ValueError(f"unknown sir-vllm engine query {command!r}")

    def take_stats(self) -> SirConnectorStats | None:
        """The events since the last call (vLLM asks after every step)."""
        return self.events.take()

    def stats(self) -> PoolStats:
        pool = self.block_pool
        return PoolStats(
            pinned_sessions=len(self.pinned),
            pinned_blocks=sum(len(p.block_ids) for p in self.pinned.values()),
            free_blocks=None if pool is None else vllm_adapter.free_block_count(pool),
            total_blocks=0 if pool is None else vllm_adapter.pool_size(pool),
            dropped_total=self.dropped_total, block_size=self.block_size)

    # -- connector API --------------------------------------------------
    def on_new_request(self, request) -> None:
        p = self.params(request)
        if p is None:
            return
        vllm_adapter.allow_connector_hits(request)
        # not idle: neither its own pins nor those it loads from are dropped
        self.active[vllm_adapter.request_id(request)] = (p.key, p.load_key)
        for key in (p.key, p.load_key):
            pin = self.pinned.get(key)
            if pin is not None:
                pin.last_used = time.monotonic()
            self.host.touch(key)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        # None: not now (vLLM skips the request this step and asks again later).
        if self._must_wait(request, num_computed_tokens):
            return None, False
        # The one side effect (pitfall 6 allows no other): free idle sessions'
        # pins when the pool cannot hold this request; repeating it is harmless.
        self._make_room(request, num_computed_tokens)
        p = self.params(request)
        if p is None:
            return 0, False
        sources = self._sources(request, p) or self._offloaded_sources(request, p)
        if not sources:
            return 0, False
        return max(0, len(sources) - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        p = self.params(request)
        if p is None:
            return
        rid = vllm_adapter.request_id(request)
        self.allocated.add(rid)
        pinned = self._sources(request, p, quiet=True)
        sources = pinned or self._offloaded_sources(request, p) or []
        kept = len(p.keep_indices())
        self.recomputed[rid] = kept - min(kept, len(sources))
        if num_external_tokens <= 0:
            return
        assert sources, "a load was granted for a session whose pins changed"
        start = len(sources) - num_external_tokens  # pitfall 1: never rewrite local hits
        src = sources[start:]
        dst = slots(vllm_adapter.block_table(blocks), range(start, len(sources)), self.block_size)
        delta = [d - s for s, d in zip(src, range(start, len(sources)))]
        if not pinned:  # from the host tier
            self.host.restore(rid, p.load_key, src, dst, delta)
            self.events.record_restored(len(src))
            return
        pin = self.pinned[p.load_key]
        self.jobs.append(LoadJob(req_id=rid, src_slots=slots(pin.block_ids, src, self.block_size),
                                 dst_slots=dst, delta=delta))

    def build_connector_meta(self, scheduler_output) -> SirConnectorMetadata:
        meta = SirConnectorMetadata(loads=self.jobs, host_ops=self.host.take_ops())
        if meta.host_ops:  # a save reads blocks this step's forward may write
            vllm_adapter.copy_before_forward(scheduler_output)
        self.jobs = []
        return meta

    def request_finished(self, request, block_ids: list[int]):
        rid = vllm_adapter.request_id(request)
        self.active.pop(rid, None)
        self.allocated.discard(rid)
        self.held.discard(rid)
        recomputed = self.recomputed.pop(rid, None) or 0
        p = self.params(request)
        if p is None:
            return False, None
        if recomputed:
            self.events.record_recomputed(recomputed)
        if not vllm_adapter.finished_ok(request):
            return False, None  # aborted or failed: the old pins stay, the API keeps the old state
        num = vllm_adapter.num_computed_tokens(request)
        pinned = 0
        if not p.peek:
            need = -(-num // self.block_size)
            block_ids = list(block_ids[:need])
            vllm_adapter.pin_blocks(self.block_pool, block_ids)
            self._release(p.key)
            self.host.forget(p.key)  # a saved copy of an older state
            self.pinned[p.key] = Pinned(block_ids, vllm_adapter.computed_token_ids(request, num),
                                        turn=p.turn, origin=origin_of(p), name=p.name)
            pinned = num
            if p.release_source and p.load_key != p.key:
                self._release(p.load_key)  # a long turn's passes are done: their pins go
                self.host.forget(p.load_key)
        reply = TurnReply(pinned=pinned, recomputed=recomputed)
        if not p.peek:
            self._remember_reply(p.turn, reply)
        return False, reply.to_kv_transfer_params()
