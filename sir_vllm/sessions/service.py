"""The sessions service: one session turn from request to committed state.

Everything a session turn does that is not HTTP: take the session's lease
(one request per session), load its state, resolve a chat request's messages
against it (continue, roll back, rebuild: `sessions.history`), render the new
tokens, plan the eviction, run the turn on the engine (a completions request,
whole or streamed), read the scores, commit the new state to the store, and
describe the session in the `session` object. The engine is injected
(`sessions.engine.Engine`), so all of this is unit-tested without a server.

Nothing changes until a turn has finished normally: an engine error, a client
that disconnects mid-stream (the engine aborts the request and keeps its old
pins) or a peek leaves the store and the engine's pins as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from sir_vllm.connector.protocol import EngineQuery, TurnReply
from sir_vllm.sessions import history
from sir_vllm.sessions.engine import Engine, EngineError, OutputReader
from sir_vllm.policy.chunks import TurnSplit, default_chunk, fits_whole, max_chunk, split_turn
from sir_vllm.sessions.state import SessionState, Snapshot
from sir_vllm.sessions.store import SessionStore
from sir_vllm.sessions.turn import TurnError, TurnPlan, commit_turn, plan_turn, tokens_needed

logger = logging.getLogger("vllm.sir_vllm.sessions")

CHAT, COMPLETIONS = "chat", "completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
CHAT_MAX_TOKENS_CAP = 256  # a chat turn's default reservation: budget // 4, at most this


class SessionError(Exception):
    """A turn the session cannot take, with the HTTP status to answer (400, 404, 409)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class TurnRequest:
    """A session turn as the client asked for it, fields already checked."""

    api: str  # CHAT or COMPLETIONS
    tenant: str
    session_id: str
    engine_body: dict = field(default_factory=dict)  # passed to vLLM's completions as is
    stream: bool = False
    prompt: str | list[int] | None = None  # completions: text or token ids
    add_special_tokens: bool = True  # completions text on a first turn
    messages: list[dict] | None = None  # chat: normalized messages
    max_tokens: int | None = None  # None: the API's default
    policy: object | None = None  # a per-request policy (first turn), None: the session's
    peek: bool = False
    reserve: int | None = None
    context: object = None  # the engine's handle on the client's connection (opaque here)


@dataclass
class ServiceConfig:
    default_policy: object
    rollback_turns: int = 4
    max_turn_tokens: int = 4_194_304  # new tokens + max_tokens of one turn (--kv-max-turn-tokens)
    chunk_tokens: int | None = None  # a long turn's pass size (None: a quarter of the room)
    window: int | None = None  # the model's context: a first turn beyond it runs long
    vocab_size: int | None = None  # token ids a prompt may hold: 0 to vocab_size - 1


def chat_default_max_tokens(policy) -> int:
    """A chat turn's answer when the client names no length: budget // 4, at
    most CHAT_MAX_TOKENS_CAP (a turn that then outgrows the room runs long)."""
    return min(CHAT_MAX_TOKENS_CAP, max(1, policy.cache_size // 4))


@dataclass
class Pass:
    """One engine request of a turn, and what came back."""

    plan: TurnPlan
    max_tokens: int  # 0: a prefill pass
    reader: OutputReader
    reply: TurnReply | None = None


async def _nothing() -> None:
    """A turn made outside `SessionService.turn` holds no lease."""


class Turn:
    """One prepared turn: `complete()` or `stream()` runs it, then commits it.

    A turn that fits runs as one engine request (its plan is made when the
    turn is prepared, so a refusal is a 400 before anything runs). A long turn
    (`sir_vllm.policy.chunks`) runs pass by pass, each planned on the state the
    previous one left: its input in prefill pieces, its answer in segments,
    streamed or returned as one answer. Its passes pin under a key of their
    own; only when the last one has finished do its pins become the session's
    (EngineQuery.MOVE) and its state the store's, so an aborted long turn
    leaves the session, store and pins, as it was."""

    def __init__(self, service: SessionService, req: TurnRequest, state: SessionState,
                 plan: TurnPlan | None, max_tokens: int, resolution: history.Resolution | None,
                 new_messages: list[dict] | None, new_ids: list[int], split: TurnSplit | None = None):
        self.service, self.req, self.state, self.plan = service, req, state, plan
        self.max_tokens = max_tokens
        self.resolution = resolution
        self.new_messages = new_messages
        self.new_ids = new_ids
        self.split = split
        self.passes: list[Pass] = []
        self.session: dict | None = None  # the `session` object, once the turn is committed
        self.text: str = ""  # the answer's text as vLLM detokenized it
        self._key = state.key if split is None else f"{state.key}~long"
        self._fed = 0  # a long turn: new tokens its prefill pieces took
        self._last_out: dict | None = None  # a long prefill turn: its last piece's response
        self.release_lease: Callable[[], Awaitable[None]] = _nothing  # set by SessionService.turn

    @property
    def _scores(self) -> bool:
        return self.state.policy.needs_scores and not self.req.peek

    @property
    def echo(self) -> bool:
        """A streamed turn that needs scores asks vLLM to echo the prompt's log-probs."""
        return self.req.stream and self._scores

    @property
    def kept(self) -> int:
        """Tokens of the session's memory the turn starts from (loaded or recomputed)."""
        return self.passes[0].plan.kept if self.passes else (self.plan.kept if self.plan else 0)

    @property
    def long(self) -> bool:
        return self.split is not None

    # -- one pass -------------------------------------------------------------
    def _body(self, plan: TurnPlan, max_tokens: int, stream: bool) -> dict:
        """The completions request the engine runs for one pass."""
        body = dict(self.req.engine_body)
        salt = self.state.cache_salt
        if self.req.peek:
            salt = f"{salt}-peek-{uuid.uuid4().hex}"  # its blocks never serve a later turn
        body.update(prompt=plan.prompt_ids, max_tokens=max(1, max_tokens), cache_salt=salt,
                    return_token_ids=True,
                    kv_transfer_params=plan.params.to_kv_transfer_params(
                        body.get("kv_transfer_params")))
        if self._scores:
            body["logprobs"] = body.get("logprobs") or 0
            if stream:
                body["echo"] = True  # streams carry prompt log-probs only this way
            else:
                body["prompt_logprobs"] = body.get("prompt_logprobs") or 0
        body["stream"] = stream
        if not stream:
            body.pop("stream_options", None)
        return body

    def _next_plan(self, base: Snapshot, new_ids: list[int], max_tokens: int) -> TurnPlan:
        index = len(self.passes)
        return plan_turn(base, self.state.policy, self._key, new_ids, max_tokens, name=self.state.id,
                         continues=index > 0, source=self.state.key if index == 0 else self._key)

    def _commit_pass(self, p: Pass, final: bool) -> Snapshot:
        messages = chain = None
        if final and self.req.api == CHAT:
            consumed = [*self.new_messages, {"role": "assistant", "content": self.text}]
            chain = history.chain_of(consumed, self.state.head.chain)[-1]
            messages = self.state.head.messages + len(consumed)
        return commit_turn(p.plan, self.state.policy, p.reader.output_ids, p.reader.prompt_logprobs,
                           p.reader.output_logprobs, prefill_only=p.max_tokens == 0,
                           messages=messages, chain=chain, continues=len(self.passes) > 1)

    async def _complete_pass(self, plan: TurnPlan, max_tokens: int) -> tuple[Pass, dict]:
        p = Pass(plan, max_tokens, OutputReader())
        self.passes.append(p)
        out = await self.service.engine.complete(self._body(plan, max_tokens, False), self.req.context)
        p.reader.read_response(out)
        p.reply = p.reader.reply
        return p, out

    async def _reply_of(self, p: Pass) -> None:
        try:
            p.reply = TurnReply.from_dict(
                await self.service.engine.query(EngineQuery.REPLY, p.plan.params.turn))
        except Exception as e:  # the reply only reports; the pass itself is done
            logger.warning("sir-vllm: session %s: no engine reply for a streamed turn: %s",
                           self.state.id, e)

    # -- a whole turn ---------------------------------------------------------
    async def complete(self) -> dict:
        """Run the turn whole; returns vLLM's completions response (untrimmed;
        a long turn's passes joined into one) after committing; `self.session`
        describes the session."""
        try:
            if not self.long:
                p, out = await self._complete_pass(self.plan, self.max_tokens)
                self.text = p.reader.text
                await self._finish(None if self.req.peek else self._commit_pass(p, True))
                return out
            base = await self._prefill_pieces()
            outs = []
            for k, (new, seg) in enumerate(self._segment_inputs()):
                p, out = await self._complete_pass(self._next_plan(base, new, seg), seg)
                outs.append(out)
                self.text += p.reader.text
                final = p.reader.finish_reason == "stop" or k == len(self.split.segments) - 1
                base = self._commit_pass(p, final)
                if final:
                    break
            if not outs:  # a prefill turn: its pieces were all of it
                outs = [self._last_out]
            await self._finish(base)
            return join_responses(outs)
        finally:
            await self._forget_partial()

    # -- a streamed turn ------------------------------------------------------
    async def stream(self) -> AsyncIterator[tuple[dict, bool]]:
        """Run the turn streamed: yields (chunk, final) as vLLM sends them,
        without the `echo` the session layer asked for. The final chunk (the
        usage chunk when `stream_options.include_usage` is set, else the one
        carrying `finish_reason`) is held until the turn is committed, so
        `self.session` is set when it is yielded. A long answer's segments
        stream as one answer (one id, one finish, one usage). Closing the
        iterator early (the client left) aborts the turn: nothing is committed."""
        include_usage = bool((self.req.engine_body.get("stream_options") or {}).get("include_usage"))
        try:
            base = await self._prefill_pieces() if self.long else None
            segments = [(None, self.max_tokens)] if not self.long else list(self._segment_inputs())
            held, head, usage = None, None, {"prompt_tokens": 0, "completion_tokens": 0}
            for k, (new, seg) in enumerate(segments):
                plan = self.plan if not self.long else self._next_plan(base, new, seg)
                p = Pass(plan, seg, OutputReader(echo=self.echo))
                self.passes.append(p)
                shift = len(self.text)
                last_planned = k == len(segments) - 1
                async for raw in self.service.engine.stream(self._body(plan, seg, True), self.req.context):
                    chunk = p.reader.read_chunk(raw)
                    head = head or {"id": chunk.get("id"), "created": chunk.get("created")}
                    chunk.update(head)
                    if chunk.get("usage") and not chunk.get("choices"):
                        for key in usage:
                            usage[key] += int(chunk["usage"].get(key) or 0)
                        held = chunk
                        continue
                    finishing = False
                    for choice in chunk.get("choices") or []:
                        self.text += choice.get("text") or ""
                        _shift_offsets(choice, shift)
                        if choice.get("finish_reason") is not None:
                            if choice["finish_reason"] == "stop" or last_planned:
                                finishing = True
                            else:  # a segment's end, not the answer's
                                choice.update(finish_reason=None, stop_reason=None)
                    if finishing and not include_usage:
                        held = chunk
                        continue
                    yield chunk, False
                if p.reader.finish_reason is None:
                    raise EngineError(502, b'{"error": "the engine stream ended without a finish"}')
                if not self.req.peek:
                    await self._reply_of(p)
                final = p.reader.finish_reason == "stop" or last_planned
                if not self.req.peek:
                    base = self._commit_pass(p, final)
                if final:
                    break
            if held is not None and not held.get("choices") and held.get("usage"):
                held["usage"] = {**held["usage"], **usage,
                                 "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            if not self.req.peek and await self.service.engine.client_left(self.req.context):
                raise EngineError(499, b'{"error": "the client left before the turn was committed"}')
            await self._finish(base)
            if held is not None:
                yield held, True
        finally:
            await self._forget_partial()

    # -- a long turn's passes ---------------------------------------------------
    async def _prefill_pieces(self) -> Snapshot:
        """Run the input pieces that go before the answer (all of them for a
        prefill turn); returns the state they leave."""
        base = self.state.head
        pieces = self.split.pieces if not self.split.segments else self.split.pieces[:-1]
        at = 0
        for i, size in enumerate(pieces):
            take = size - (base.pending is not None) if i == 0 else size
            p, self._last_out = await self._complete_pass(
                self._next_plan(base, self.new_ids[at:at + take], 0), 0)
            at += take
            base = self._commit_pass(p, final=not self.split.segments and i == len(pieces) - 1)
        self._fed = at
        return base

    def _segment_inputs(self):
        """(new tokens, max_tokens) of each answer segment: the last piece's
        new tokens go with the first."""
        for k, seg in enumerate(self.split.segments):
            yield (self.new_ids[self._fed:] if k == 0 else []), seg

    async def _forget_partial(self) -> None:
        """A long turn that did not commit leaves its passes' pins behind: free them."""
        if self.long and self.session is None and self.passes:
            await self.service.drop_pins([self._key])

    async def _finish(self, snap: Snapshot | None) -> None:
        state, req = self.state, self.req
        first = self.passes[0]
        kept = first.plan.kept
        recomputed = min(first.reply.recomputed if first.reply else 0, kept)
        info = {"id": state.id, "turns": state.turns,
                "retained_tokens": state.head.size, "loaded_tokens": kept - recomputed,
                "recomputed_tokens": recomputed, "evicted_tokens": state.head.evicted_total,
                "budget": state.policy.cache_size,
                "chunks": sum(p.max_tokens == 0 for p in self.passes) if self.long else 0,
                "segments": sum(p.max_tokens > 0 for p in self.passes)}
        if self.resolution is not None:
            info["rolled_back_turns"] = self.resolution.rolled_back
            info["rebuilt"] = self.resolution.kind == history.REBUILD
        if req.peek:
            self.session = {**info, "peek": True}
            return
        new_state = state.advanced(snap, self.service.config.rollback_turns, req.api)
        await self.service.store.put(new_state)
        if self.long:  # the last pass's pins become the session's (its old ones go)
            await self.service.engine.query(EngineQuery.MOVE, [self._key, state.key])
        self.state = new_state
        await self.release_lease()  # committed: the session may take its next turn
        last = self.passes[-1]
        if last.reply is not None and last.reply.pinned != snap.size:
            logger.warning("sir-vllm: session %s: engine pinned %s tokens, expected %d; "
                           "the next turn recomputes", state.id, last.reply.pinned, snap.size)
        if recomputed:
            logger.warning("sir-vllm: session %s: the engine no longer held its pinned KV (dropped "
                           "from a full KV pool, or a rollback); recomputed its %d kept tokens from "
                           "their ids", state.id, recomputed)
        info.update(turns=snap.turns, retained_tokens=snap.size, evicted_tokens=snap.evicted_total)
        self.session = info


def _shift_offsets(choice: dict, shift: int) -> None:
    """A later segment's text offsets continue the answer's."""
    lp = choice.get("logprobs")
    if shift and lp and isinstance(lp.get("text_offset"), list):
        lp["text_offset"] = [o + shift for o in lp["text_offset"]]


def join_responses(outs: list[dict]) -> dict:
    """A long turn's completions responses as the one response of its answer:
    the texts, token ids and log-probs one after another, the last finish,
    the usage summed (prompt tokens: what each pass was given), no prompt
    log-probs (a pass's rows cover only its own prompt)."""
    if len(outs) == 1:
        return outs[0]
    joined = copy.deepcopy(outs[0])
    choice = joined["choices"][0]
    text, ids, lps = "", [], {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    has_lp = all((o["choices"][0].get("logprobs") or None) is not None for o in outs)
    for out in outs:
        c = out["choices"][0]
        lp = c.get("logprobs") or {}
        for key in ("token_logprobs", "tokens", "top_logprobs"):
            lps[key] += list(lp.get(key) or [])
        lps["text_offset"] += [o + len(text) for o in (lp.get("text_offset") or [])]
        text += c.get("text") or ""
        ids += list(c.get("token_ids") or [])
    last = outs[-1]["choices"][0]
    choice.update(text=text, token_ids=ids, finish_reason=last.get("finish_reason"),
                  stop_reason=last.get("stop_reason"), prompt_logprobs=None,
                  logprobs=lps if has_lp else None)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for out in outs:
        for key in usage:
            usage[key] += int((out.get("usage") or {}).get(key) or 0)
    joined["usage"] = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    joined["kv_transfer_params"] = outs[-1].get("kv_transfer_params")
    return joined


class SessionService:
    def __init__(self, store: SessionStore, engine: Engine, config: ServiceConfig,
                 renderer: Callable[[], object], tokenizer: Callable[[], object] | None = None):
        """`renderer()` gives the `ChatRenderer`, `tokenizer()` the tokenizer
        (both called lazily: loading a tokenizer takes a moment)."""
        self.store = store
        self.engine = engine
        self.config = config
        self._renderer = renderer
        self._tokenizer = tokenizer or (lambda: self._renderer().tokenizer)

    # -- one turn -----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def turn(self, req: TurnRequest) -> AsyncIterator[Turn]:
        """The prepared turn, holding the session's lease until it is committed
        (before its answer is sent: a client that sends its next turn as soon as
        it has this one's answer never meets this lease) or the block ends."""
        lease = await self.store.lease(req.tenant, req.session_id)
        if lease is None:
            raise SessionError(409, f"session {req.session_id!r} has a request in progress")
        held = True

        async def release() -> None:
            nonlocal held
            if held:
                held = False
                await self.store.release(lease)

        try:
            turn = await self._prepare(req)
            turn.release_lease = release
            yield turn
        finally:
            await release()

    async def _prepare(self, req: TurnRequest) -> Turn:
        state = await self.store.get(req.tenant, req.session_id)
        if state is None:
            state = SessionState(id=req.session_id, tenant=req.tenant, key=uuid.uuid4().hex,
                                 policy=req.policy or self.config.default_policy)
        elif req.policy is not None and req.policy.to_dict() != state.policy.to_dict():
            raise SessionError(400, f"kv_policy: session {req.session_id!r} already runs "
                                    f"{state.policy!r}")
        if state.api is not None and state.api != req.api:
            where = "/v1/chat/completions" if state.api == CHAT else "/v1/completions"
            raise SessionError(400, f"session {req.session_id!r} was started on {where}; "
                                    "continue it there")
        resolution = new_messages = None
        try:
            if req.api == CHAT:
                resolution = history.resolve(state, req.messages)
                if resolution.kind == history.ROLLBACK:
                    state = state.rolled_back(resolution.rolled_back)
                elif resolution.kind == history.REBUILD:
                    state = SessionState(id=state.id, tenant=state.tenant, key=state.key,
                                         policy=state.policy, created=state.created)
                new_messages = resolution.new
                new_ids = self._chat_ids(state, new_messages)
            else:
                new_ids = self._completion_ids(state, req)
            max_tokens = self._max_tokens(state, req)
            split = self._split(state, req, new_ids, max_tokens)
            plan = None if split else plan_turn(state.head, state.policy, state.key, new_ids,
                                                max_tokens, req.reserve, name=state.id, peek=req.peek)
        except (TurnError, history.ChatError) as e:
            raise SessionError(400, str(e)) from None
        return Turn(self, req, state, plan, max_tokens, resolution, new_messages, new_ids, split)

    def _split(self, state: SessionState, req: TurnRequest, new_ids: list[int],
               max_tokens: int) -> TurnSplit | None:
        """How a turn too long to run whole is split into passes; None when it fits
        (a scoring turn, peek or reserve, always runs whole: its plan is the point)."""
        head, policy, cfg = state.head, state.policy, self.config
        coming = tokens_needed(head, new_ids, max_tokens)
        inputs = len(new_ids) + (head.pending is not None)
        if len(new_ids) + max_tokens > cfg.max_turn_tokens:
            raise TurnError(f"turn of {len(new_ids) + max_tokens} tokens ({len(new_ids)} new + "
                            f"max_tokens {max_tokens}) is above this server's limit of "
                            f"{cfg.max_turn_tokens} (--kv-max-turn-tokens)")
        if req.peek or req.reserve is not None or fits_whole(
                policy, state.turns == 0, coming, head.size + inputs + max_tokens, cfg.window):
            return None
        chunk = min(cfg.chunk_tokens or default_chunk(policy), max_chunk(policy))
        return split_turn(inputs, max_tokens, chunk)

    def _chat_ids(self, state: SessionState, messages: list[dict]) -> list[int]:
        previous = None if state.turns == 0 else list(state.head.answer_tail or ())
        try:
            return self._renderer().messages_ids(messages, previous)
        except Exception as e:  # the template refuses the messages (jinja errors, prefix checks)
            raise history.ChatError(f"messages: the chat template cannot render them: {e}") from None

    def _completion_ids(self, state: SessionState, req: TurnRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, str):
            add_special = req.add_special_tokens and state.turns == 0
            return list(self._tokenizer()(prompt, add_special_tokens=add_special)["input_ids"])
        vocab = self.config.vocab_size
        bad = next((t for t in prompt if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:  # never handed to the engine: an embedding lookup would fail there
            top = f"0 to {vocab - 1}" if vocab is not None else "0 and up"
            raise TurnError(f"prompt token id {bad} is outside the vocabulary ({top})")
        return list(prompt)

    @staticmethod
    def _max_tokens(state: SessionState, req: TurnRequest) -> int:
        if req.max_tokens is not None:
            return req.max_tokens
        if req.api == CHAT:
            return chat_default_max_tokens(state.policy)
        return DEFAULT_MAX_TOKENS

    # -- the session endpoints ---------------------------------------------
    async def get(self, tenant: str, session_id: str) -> SessionState | None:
        return await self.store.get(tenant, session_id)

    async def delete(self, tenant: str, session_id: str) -> SessionState:
        """Forget a session and free its pinned KV (an engine utility call, no forward pass)."""
        lease = await self.store.lease(tenant, session_id)
        if lease is None:
            raise SessionError(409, f"session {session_id!r} has a request in progress")
        try:
            state = await self.store.delete(tenant, session_id)
        finally:
            await self.store.release(lease)
        if state is None:
            raise SessionError(404, f"no session {session_id!r}")
        await self.drop_pins([state.key])
        return state

    async def drop_pins(self, keys: list[str]) -> None:
        try:
            await self.engine.query(EngineQuery.DROP, list(keys))
        except Exception as e:  # the pins are a cache: pool pressure frees them anyway
            logger.warning("sir-vllm: could not drop the pinned KV of %d session(s): %s", len(keys), e)

    def on_store_drop(self, state: SessionState, reason: str) -> None:
        """The store dropped a state (cap or TTL): free its pins in the background."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.create_task(self.drop_pins([state.key]))
