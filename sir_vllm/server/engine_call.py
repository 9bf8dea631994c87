"""The sessions service's engine inside `vllm serve`: vLLM's own `/v1/completions`.

A session turn runs as a completions request on token ids, handed to the ASGI
app below the session middleware (vLLM's router, with its validation, its
sampling parameters and its error messages): whole (the response is read at
once) or streamed (its SSE events are parsed and handed on one by one as vLLM
sends them). The inner request reads the client's connection after its body,
so when the client disconnects vLLM notices it and aborts the engine request,
exactly as for a stock request.

Engine utility calls (`query`) go to the EngineCore process directly
(`vllm_adapter.call_engine_utility`): no request, no forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

from sir_vllm import vllm_adapter
from sir_vllm.connector.protocol import ENGINE_UTILITY
from sir_vllm.sessions.engine import EngineError, EngineStreamError

COMPLETIONS = "/v1/completions"


@dataclass
class ClientContext:
    """The client's request, as the inner call needs it: its headers (auth,
    tracing) and its connection (`receive`: a disconnect aborts the turn)."""

    scope: dict
    receive: object


def replay(body: bytes, receive):
    """An ASGI `receive` that hands `body` once, then waits on the real client
    (vLLM listens for its disconnect to abort the request)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed


def inner_scope(scope: dict, body: bytes, path: str) -> dict:
    headers = [(k, v) for k, v in scope.get("headers", [])
               if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    return {**scope, "headers": headers, "method": "POST", "path": path, "raw_path": path.encode()}


def sse_events(buffer: bytearray) -> list[bytes]:
    """Complete `data:` payloads at the front of `buffer` (consumed from it)."""
    events = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return events
        block = bytes(buffer[:end])
        del buffer[: end + 2]
        data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data))


class AppEngine:
    """`sessions.engine.Engine` over the ASGI app below the middleware."""

    def __init__(self, app):
        self.app = app
        self.engine_client = None  # vLLM's AsyncLLM, taken from the first request's app state

    def bind(self, scope: dict) -> None:
        if self.engine_client is None:
            self.engine_client = vllm_adapter.engine_client_of(scope)

    async def complete(self, body: dict, context: ClientContext) -> dict:
        raw = json.dumps(body).encode()
        result = {"status": 500, "headers": [], "body": []}

        async def capture(msg):
            if msg["type"] == "http.response.start":
                result["status"], result["headers"] = msg["status"], msg.get("headers", [])
            elif msg["type"] == "http.response.body":
                result["body"].append(msg.get("body", b""))

        await self.app(inner_scope(context.scope, raw, COMPLETIONS), replay(raw, context.receive),
                       capture)
        data = b"".join(result["body"])
        if result["status"] != 200:
            raise EngineError(result["status"], data, result["headers"])
        return json.loads(data)

    async def stream(self, body: dict, context: ClientContext):
        raw = json.dumps(body).encode()
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.app(inner_scope(context.scope, raw, COMPLETIONS),
                                              replay(raw, context.receive), queue.put))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            start = await queue.get()
            if start is None or start.get("type") != "http.response.start":
                raise EngineError(502, b'{"error": "the engine gave no response"}')
            if start["status"] != 200:
                parts = []
                while (msg := await queue.get()) is not None:
                    parts.append(msg.get("body", b""))
                    if not msg.get("more_body"):
                        break
                raise EngineError(start["status"], b"".join(parts), start.get("headers", []))
            buffer = bytearray()
            while (msg := await queue.get()) is not None:
                buffer += msg.get("body", b"")
                for event in sse_events(buffer):
                    if event.strip() == b"[DONE]":
                        return
                    chunk = json.loads(event)
                    if "error" in chunk and not chunk.get("choices"):
                        raise EngineStreamError(chunk)
                    yield chunk
                if not msg.get("more_body"):
                    return
        finally:
            if not task.done():
                task.cancel()  # the client left, or we stopped reading: vLLM aborts the request
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def client_left(self, context: ClientContext | None) -> bool:
        """The client's body is read, so the only message left to receive is its
        disconnect: a moment's wait for one (uvicorn answers at once when gone)."""
        if context is None:
            return False
        try:
            msg = await asyncio.wait_for(context.receive(), timeout=0.005)
        except asyncio.TimeoutError:
            return False
        return msg.get("type") == "http.disconnect"

    async def query(self, command: str, argument=None):
        if self.engine_client is None:
            raise RuntimeError("no engine client yet (no request has reached the server)")
        return await vllm_adapter.call_engine_utility(self.engine_client, ENGINE_UTILITY, command,
                                                      argument)

