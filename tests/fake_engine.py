"""A scripted stand-in for vLLM's completions endpoint and the connector's pins,
for unit tests of the sessions service (no server, no model).

The "model" is a pure function of the token ids: the next token after a
sequence is `1000 + sum(ids) % 97`, every token's log-prob `-(1 + id % 5) / 4`.
So a turn's answer depends on the whole prompt, and two paths that build the
same prompt get the same answer. The pins follow the connector's rules
(`TurnParams`): a turn whose `expect` names the pinned turn loads its kept
tokens, anything else recomputes them and says how many.
"""

from __future__ import annotations

import copy

from sir_vllm.connector.protocol import EngineQuery, TurnParams, TurnReply
from sir_vllm.sessions.engine import EngineError


def next_token(ids: list[int]) -> int:
    return 1000 + sum(ids) % 97


def logprob(token: int) -> float:
    return -(1 + token % 5) / 4


class FakeEngine:
    def __init__(self, eos: int | None = None):
        self.pins: dict[str, tuple] = {}  # key -> (turn id, token ids, origin)
        self.replies: dict[str, dict] = {}
        self.bodies: list[dict] = []
        self.dropped: list[str] = []
        self.eos = eos
        self.fail_with: EngineError | None = None
        self.client_gone = False  # what client_left answers

    # -- the connector's side ------------------------------------------------
    def _turn(self, body: dict) -> tuple[list[int], list[int], TurnReply | None, TurnParams | None]:
        self.bodies.append(copy.deepcopy(body))
        if self.fail_with is not None:
            raise self.fail_with
        prompt = list(body["prompt"])
        out, seq = [], list(prompt)
        for _ in range(body["max_tokens"]):
            tok = next_token(seq)
            out.append(tok)
            seq.append(tok)
            if self.eos is not None and tok == self.eos:
                break
        p = TurnParams.from_kv_transfer_params(body.get("kv_transfer_params"))
        if p is None:
            return prompt, out, None, None
        pin = self.pins.get(p.load_key)
        kept = len(p.keep_indices())
        if pin is not None and p.expect is not None and pin[0] == p.expect and len(pin[1]) == p.old_len:
            recomputed = 0
        elif pin is not None and p.expect is not None and pin[2] == (p.load_key, p.expect, p.old_len,
                                                                     p.keep):
            shared = next((i for i, (x, y) in enumerate(zip(pin[1], prompt[:-1])) if x != y),
                          min(len(pin[1]), len(prompt) - 1))
            recomputed = kept - min(kept, shared)  # a replayed turn: the common prefix in place
        else:
            recomputed = kept
        return prompt, out, TurnReply(pinned=0 if p.peek else len(prompt) + len(out) - 1,
                                      recomputed=recomputed), p

    def _finish(self, prompt, out, reply, p) -> None:
        if p is not None and not p.peek:
            self.pins[p.key] = (p.turn, [*prompt, *out[:-1]], (p.load_key, p.expect, p.old_len, p.keep))
            self.replies[p.turn] = {"pinned": reply.pinned, "recomputed": reply.recomputed}

    # -- the Engine protocol ---------------------------------------------------
    async def complete(self, body: dict, context=None) -> dict:
        prompt, out, reply, p = self._turn(body)
        self._finish(prompt, out, reply, p)
        choice = {"index": 0, "text": "".join(f"<{t}>" for t in out), "token_ids": out,
                  "prompt_token_ids": prompt, "finish_reason": "length", "stop_reason": None,
                  "logprobs": None, "prompt_logprobs": None}
        if body.get("logprobs") is not None:
            choice["logprobs"] = {"token_logprobs": [logprob(t) for t in out],
                                  "tokens": [f"<{t}>" for t in out], "text_offset": [],
                                  "top_logprobs": None}
        if body.get("prompt_logprobs") is not None:
            choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": logprob(t)}} for t in prompt[1:]]
        resp = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
                "choices": [choice], "usage": {"prompt_tokens": len(prompt),
                                               "completion_tokens": len(out),
                                               "total_tokens": len(prompt) + len(out)}}
        if reply is not None:
            resp["kv_transfer_params"] = reply.to_kv_transfer_params()
        return resp

    async def stream(self, body: dict, context=None):
        prompt, out, reply, p = self._turn(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for i, tok in enumerate(out):
            choice = {"index": 0, "text": f"<{tok}>", "token_ids": [tok],
                      "finish_reason": "length" if i == len(out) - 1 else None, "stop_reason": None,
                      "logprobs": None}
            lps = [logprob(tok)]
            if i == 0:
                choice["prompt_token_ids"] = prompt
                if body.get("echo"):
                    lps = [None] + [logprob(t) for t in prompt[1:]] + lps
            if body.get("logprobs") is not None:
                choice["logprobs"] = {"token_logprobs": lps, "tokens": [], "text_offset": [],
                                      "top_logprobs": None}
            yield {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
                   "choices": [choice]}
        self._finish(prompt, out, reply, p)  # the engine finished: request_finished ran
        if include_usage:
            yield {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
                   "choices": [], "usage": {"prompt_tokens": len(prompt),
                                            "completion_tokens": len(out)}}

    async def client_left(self, context) -> bool:
        return self.client_gone

    async def query(self, command: str, argument=None):
        if command == EngineQuery.DROP:
            self.dropped += list(argument)
            return sum(self.pins.pop(k, None) is not None for k in argument)
        if command == EngineQuery.MOVE:
            src, dst = argument
            if src not in self.pins:
                return False
            self.pins[dst] = self.pins.pop(src)
            return True
        if command == EngineQuery.REPLY:
            return self.replies.pop(argument, None)
        raise ValueError(command)
