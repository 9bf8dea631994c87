"""The load generator: S concurrent chat sessions of T turns against one server.

Two ways to hold a conversation, one token stream (`sir_vllm.chat.ChatRenderer`):

* **session** (`--kv-policy sirllm|streaming` servers): each request carries
  only the new turn's token ids and a `session_id`; the server keeps the KV.
* **resend** (stock vLLM, what clients do today): no session id; each request
  carries the whole conversation so far (every earlier turn and answer, then
  the new turn) and the prefix cache saves what it can.

Each turn asks for exactly `max_tokens` tokens (greedy, `ignore_eos`), through
the official `openai` client (`AsyncOpenAI`, no retries: a failure is a result).

**Streaming** (the default, every policy alike): each request has
`stream: true` and `stream_options.include_usage`, so the last chunk before
`data: [DONE]` carries the usage (and the server's per-request metrics) and,
for a session, the `session` object. Measured on the client as
`vllm bench serve` does: TTFT = request sent -> first chunk with a token;
TPOT = (last token's chunk - first token's chunk) / (output tokens - 1);
latency = request sent -> end of the stream.

**Not streaming** (`--no-stream`, the measurement from before sessions could
stream): TTFT is estimated as the turn latency minus the server's decode
interval (first to last output token, `metrics.generation_time_ms` of
`vllm serve --enable-per-request-metrics`), TPOT as that interval / (output
tokens - 1). Servers without that flag leave both empty. The same estimate is
kept beside the measured figures of a streamed turn (`ttft_estimate_ms`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass, field

SESSION = "session"
RESEND = "resend"


@dataclass
class TurnRecord:
    policy: str
    concurrency: int          # sessions in flight in this run
    session: int              # 0-based session index
    turn: int                 # 1-based turn number within the session
    ok: bool
    start_s: float            # since the run began
    latency_ms: float
    status: int | None = None         # HTTP status of a failure (None: no response)
    error: str | None = None
    streamed: bool = False
    ttft_ms: float | None = None      # streamed: sent -> first token; else ttft_estimate_ms
    tpot_ms: float | None = None      # streamed: per output token after the first; else the server's
    ttft_estimate_ms: float | None = None  # latency - server decode interval (either mode)
    token_chunks: int | None = None   # streamed: chunks that carried tokens
    prefill_ms: float | None = None   # server: scheduled -> first token
    queue_ms: float | None = None     # server: queued -> scheduled
    new_tokens: int = 0               # the turn's own tokens (what a session request sends)
    prompt_tokens: int | None = None  # the engine's prompt (usage.prompt_tokens)
    cached_tokens: int | None = None  # prompt tokens not computed (prefix cache / session KV)
    output_tokens: int = 0
    context_tokens: int = 0           # conversation length after this turn (all turns + answers)
    kv_tokens: int | None = None      # KV the conversation holds after the turn
    loaded_tokens: int | None = None  # session: kept tokens loaded from the previous turn
    recomputed_tokens: int | None = None  # session: kept tokens found unpinned, recomputed
    evicted_tokens: int | None = None  # session: tokens evicted so far (cumulative)
    budget: int | None = None         # session: the policy's cache size
    request_id: str | None = None     # the response's id (joins the server log)
    compaction_ms: float | None = None  # session: the worker's copy + re-rotation (server log)
    compaction_tokens: int | None = None
    rotated_tokens: int | None = None

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_ms / 1000.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Conversation:
    """One session's token stream as the client sees it."""

    renderer: object  # sir_vllm.chat.ChatRenderer
    keep_history: bool = True
    history: list[int] = field(default_factory=list)
    length: int = 0
    last_answer: list[int] | None = None

    def new_ids(self, user: str) -> list[int]:
        return self.renderer.turn_ids(user, self.last_answer)

    def prompt(self, mode: str, new: list[int]) -> list[int]:
        return list(new) if mode == SESSION else [*self.history, *new]

    def commit(self, new: list[int], answer: list[int]) -> None:
        if self.keep_history:
            self.history.extend(new)
            self.history.extend(answer)
        self.length += len(new) + len(answer)
        self.last_answer = list(answer)


def _error_text(exc: Exception) -> tuple[int | None, str]:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
    return status, str(message or getattr(exc, "message", None) or exc) or type(exc).__name__


def _server_estimates(rec: TurnRecord, metrics: dict) -> None:
    """TTFT and TPOT from the server's decode interval (the non-streaming figures)."""
    gen = metrics.get("generation_time_ms")
    if gen is None:
        return
    rec.ttft_estimate_ms = max(0.0, rec.latency_ms - float(gen))
    rec.ttft_ms = rec.ttft_estimate_ms
    rec.tpot_ms = float(gen) / (rec.output_tokens - 1) if rec.output_tokens > 1 else None


def parse_response(rec: TurnRecord, out: dict, mode: str, context_tokens: int) -> list[int]:
    """Fill `rec` from a completions response (a dict); returns the answer's ids."""
    rec.request_id = out.get("id")
    choice = out["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:
        raise RuntimeError("the server did not return token_ids (needs vLLM >= 0.10's return_token_ids)")
    usage = out.get("usage") or {}
    rec.output_tokens = int(usage.get("completion_tokens") or len(ids))
    rec.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    rec.cached_tokens = details.get("cached_tokens")
    rec.context_tokens = context_tokens + rec.new_tokens + len(ids)
    metrics = out.get("metrics") or {}
    _server_estimates(rec, metrics)
    rec.prefill_ms = metrics.get("time_to_first_token_ms")
    rec.queue_ms = metrics.get("queue_time_ms")
    session = out.get("session")
    if mode == SESSION:
        if not session:
            raise RuntimeError("a session turn came back without a `session` object: "
                               "is the server running with --kv-policy sirllm|streaming?")
        rec.kv_tokens = session.get("retained_tokens")
        rec.loaded_tokens = session.get("loaded_tokens")
        rec.recomputed_tokens = session.get("recomputed_tokens")
        rec.evicted_tokens = session.get("evicted_tokens")
        rec.budget = session.get("budget")
    else:
        # stock vLLM holds the whole conversation (prompt + answer) for this request
        rec.kv_tokens = (rec.prompt_tokens or 0) + rec.output_tokens
    return list(ids)


def assemble_stream(chunks: list[dict]) -> dict:
    """A stream's chunks as one completions response: the answer's token ids
    joined, the usage and metrics of the usage chunk, the `session` object of
    the chunk that carries it (the last one before [DONE])."""
    if not chunks:
        raise RuntimeError("the stream ended without a chunk")
    ids: list[int] = []
    out: dict = {"id": chunks[0].get("id")}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            piece = choice.get("token_ids")
            if piece is None and choice.get("text"):
                raise RuntimeError("the server did not stream token_ids "
                                   "(needs vLLM >= 0.10's return_token_ids)")
            ids.extend(piece or [])
        for key in ("usage", "metrics", "session"):
            if chunk.get(key) is not None:
                out[key] = chunk[key]
    out["choices"] = [{"token_ids": ids}]
    return out


def stream_timings(sent: float, chunks: list[tuple[float, dict]],
                   output_tokens: int | None = None) -> tuple[float | None, float | None, int]:
    """(TTFT ms, TPOT ms, chunks with tokens) from each chunk's arrival time (seconds).

    TTFT: `sent` -> the first chunk that carries a token. TPOT: (the last
    token's chunk - the first token's chunk) / (output tokens - 1), as `vllm
    bench serve` computes it (`output_tokens`: the usage's count, else the
    tokens the chunks carried); None for a one-token answer."""
    times, tokens = [], 0
    for at, chunk in chunks:
        n = sum(len(c.get("token_ids") or ()) or bool(c.get("text"))
                for c in chunk.get("choices") or [])
        if n:
            times.append(at)
            tokens += n
    if not times:
        return None, None, 0
    tokens = output_tokens or tokens
    ttft = (times[0] - sent) * 1000.0
    tpot = (times[-1] - times[0]) * 1000.0 / (tokens - 1) if tokens > 1 else None
    return ttft, tpot, len(times)


def parse_stream(rec: TurnRecord, sent: float, chunks: list[tuple[float, dict]], mode: str,
                 context_tokens: int) -> list[int]:
    """Fill `rec` from a streamed turn: (arrival time, chunk) pairs, `sent` the
    time the request went out (`rec.latency_ms` already set); returns the answer's ids."""
    ids = parse_response(rec, assemble_stream([c for _, c in chunks]), mode, context_tokens)
    rec.streamed = True
    rec.ttft_ms, rec.tpot_ms, rec.token_chunks = stream_timings(sent, chunks, rec.output_tokens)
    if rec.ttft_ms is None:
        raise RuntimeError("the stream carried no token")
    return ids


async def _streamed(client, **kwargs) -> list[tuple[float, dict]]:
    """The request streamed to its end: (arrival time, chunk) for every chunk."""
    stream = await client.completions.create(stream=True, stream_options={"include_usage": True},
                                             **kwargs)
    chunks = []
    async with stream:
        async for chunk in stream:
            chunks.append((time.perf_counter(), chunk.model_dump()))
    return chunks


async def run_turn(client, model: str, mode: str, prompt: list[int], max_tokens: int,
                   session_id: str | None, rec: TurnRecord, t0: float,
                   context_tokens: int, stream: bool = True) -> list[int] | None:
    """One request (streamed unless `stream` is False); fills `rec`; the
    answer's ids, or None on failure."""
    body = {"return_token_ids": True, "ignore_eos": True}
    if session_id is not None:
        body["session_id"] = session_id
    args = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body=body)
    start = time.perf_counter()
    rec.start_s = start - t0
    try:
        if stream:
            chunks = await _streamed(client, **args)
            rec.latency_ms = (time.perf_counter() - start) * 1000.0
            ids = parse_stream(rec, start, chunks, mode, context_tokens)
        else:
            resp = await client.completions.create(**args)
            rec.latency_ms = (time.perf_counter() - start) * 1000.0
            ids = parse_response(rec, resp.model_dump(), mode, context_tokens)
        rec.ok = True
        return ids
    except Exception as exc:  # a failed turn is a measurement, not a crash
        rec.latency_ms = (time.perf_counter() - start) * 1000.0
        rec.ok = False
        rec.status, rec.error = _error_text(exc)
        return None


@dataclass
class LoadResult:
    records: list[TurnRecord]
    duration_s: float
    session_ids: list[str]


def make_client(url: str, api_key: str = "unused", timeout: float = 3600.0):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, timeout=timeout,
                       max_retries=0)


async def run_load(url: str, model: str, mode: str, workload: list[list[str]], renderer,
                   max_tokens: int, policy: str, api_key: str = "unused", progress=None,
                   tag: str = "bench", timeout: float = 3600.0, stream: bool = True) -> LoadResult:
    """Every session of `workload` at once, each turn after the previous answer.

    A session stops at its first failed turn (its conversation cannot go on:
    stock vLLM's `max_model_len`, for one)."""
    concurrency = len(workload)
    records: list[TurnRecord] = []
    run_id = uuid.uuid4().hex[:8]
    session_ids = [f"{tag}-{policy}-{run_id}-{i}" for i in range(concurrency)] if mode == SESSION else []
    client = make_client(url, api_key, timeout)
    t0 = time.perf_counter()

    async def one_session(i: int, msgs: list[str]) -> None:
        conv = Conversation(renderer, keep_history=(mode == RESEND))
        sid = session_ids[i] if mode == SESSION else None
        for t, user in enumerate(msgs, 1):
            new = conv.new_ids(user)
            rec = TurnRecord(policy, concurrency, i, t, False, 0.0, 0.0, new_tokens=len(new),
                             context_tokens=conv.length + len(new))
            answer = await run_turn(client, model, mode, conv.prompt(mode, new), max_tokens,
                                    sid, rec, t0, conv.length, stream)
            records.append(rec)
            if progress is not None:
                progress.update(1)
            if answer is None:
                if progress is not None:
                    progress.update(len(msgs) - t)
                return
            conv.commit(new, answer)

    try:
        await asyncio.gather(*(one_session(i, m) for i, m in enumerate(workload)))
        duration = max((r.end_s for r in records), default=0.0)
    finally:
        await client.close()
    records.sort(key=lambda r: (r.session, r.turn))
    return LoadResult(records, duration, session_ids)


async def delete_sessions(url: str, session_ids: list[str], api_key: str = "unused") -> int:
    """Free the sessions' KV on the server (DELETE /v1/sessions/{id}); returns how many went."""
    if not session_ids:
        return 0
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"}
    done = 0
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=120) as h:
        for sid in session_ids:
            try:
                r = await h.delete(f"/v1/sessions/{sid}")
                done += r.status_code == 200
            except httpx.HTTPError:
                pass
    return done
