"""The engine as the sessions service sees it: one completions request per turn.

The service never imports vLLM. It talks to an `Engine`: vLLM's own
`/v1/completions` behind the server's ASGI app in production
(`sir_vllm.server.engine_call`), a scripted fake in unit tests. A turn's
request is a completions body on token ids; what comes back is read by one
reader (`OutputReader`) from either form vLLM answers in:

* a whole response (non-streaming): the turn's scores from `prompt_logprobs`
  (rows of the prompt tokens) and `logprobs.token_logprobs` (the answer);
* SSE chunks (streaming): vLLM 0.32 streams no `prompt_logprobs`, so a
  streaming turn that needs scores asks for `echo` with `logprobs`: the first
  chunk then carries the prompt tokens' log-probs ahead of the answer's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from sir_vllm.connector.protocol import TurnReply


class EngineError(Exception):
    """vLLM answered with an error: the client gets it as vLLM gave it."""

    def __init__(self, status: int, body: bytes, headers: list | None = None):
        super().__init__(f"HTTP {status}")
        self.status, self.body, self.headers = status, body, headers or []


class EngineStreamError(Exception):
    """vLLM reported an error inside a stream (an `error` chunk): forwarded, nothing committed."""

    def __init__(self, chunk: dict):
        super().__init__(str(chunk.get("error")))
        self.chunk = chunk


class Engine(Protocol):
    async def complete(self, body: dict, context) -> dict:
        """A non-streaming completions response (raises EngineError). `context`
        is the turn request's own (`TurnRequest.context`), opaque here."""

    def stream(self, body: dict, context) -> AsyncIterator[dict]:
        """The chunks of a streaming completions response, `[DONE]` excluded
        (raises EngineError before the first chunk, EngineStreamError inside)."""

    async def query(self, command: str, argument=None):
        """An engine utility call (`sir_vllm.connector.protocol.EngineQuery`)."""

    async def client_left(self, context) -> bool:
        """Whether the turn's client has gone (checked before a streamed turn
        commits: an engine request that finished before anyone saw the
        disconnect must not commit a turn the client never got)."""


@dataclass
class OutputReader:
    """Token ids and log-probs of one turn, from vLLM's completions output."""

    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)  # per prompt position
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None
    reply: TurnReply | None = None
    usage: dict | None = None
    echo: bool = False  # streaming with echo: the first chunk's logprobs start with the prompt's
    text: str = ""  # the answer's text, as vLLM detokenized it
    _first: bool = True
    _offset_base: int = 0

    def read_response(self, out: dict) -> None:
        choice = out["choices"][0]
        self.prompt_ids = list(choice.get("prompt_token_ids") or [])
        rows = choice.get("prompt_logprobs") or []
        self.prompt_logprobs = [_row_logprob(row, t) for row, t in zip(rows, self.prompt_ids)]
        self.output_ids = list(choice.get("token_ids") or [])
        lp = choice.get("logprobs") or {}
        self.output_logprobs = list(lp.get("token_logprobs") or [])
        self.finish_reason = choice.get("finish_reason")
        self.text = choice.get("text") or ""
        self.usage = out.get("usage")
        self.reply = TurnReply.from_kv_transfer_params(out.get("kv_transfer_params"))

    def read_chunk(self, chunk: dict) -> dict:
        """Read one streamed chunk; returns it as the client sees it without
        `echo` (the prompt's rows cut from the log-probs, the answer's text
        offsets counted from the answer), a copy."""
        chunk = copy.deepcopy(chunk)
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            ids = list(choice.get("token_ids") or [])
            lp = choice.get("logprobs") or {}
            if self._first:
                self._first = False
                self.prompt_ids = list(choice.get("prompt_token_ids") or [])
                if self.echo and lp:
                    n = len(self.prompt_ids)
                    self.prompt_logprobs = list(lp.get("token_logprobs") or [])[:n]
                    offsets = lp.get("text_offset") or []
                    self._offset_base = offsets[n] if len(offsets) > n else 0
                    for key in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                        if isinstance(lp.get(key), list):
                            lp[key] = lp[key][n:]
            if self.echo and isinstance(lp.get("text_offset"), list):
                lp["text_offset"] = [o - self._offset_base for o in lp["text_offset"]]
            self.output_ids += ids
            self.output_logprobs += list(lp.get("token_logprobs") or [])
            self.text += choice.get("text") or ""
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        return chunk


def _row_logprob(row, token: int) -> float | None:
    if not row:
        return None
    entry = row.get(str(token), row.get(token))
    return None if entry is None else float(entry["logprob"])
