"""Replay one conversation as a session, on the oracle or a live server.

Both replayers build the same token stream (`sir_vllm.chat.ChatRenderer`): the
server receives each turn as token ids on the completions API with a
session id, so the two paths differ only in where the KV lives.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .chat import ChatRenderer
from .policy import Policy


@dataclass
class ReplayTurn:
    answer: str
    token_ids: list[int]
    retained: int
    logprobs: list[float] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)


def _renderer(model: str) -> ChatRenderer:
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(model))


class ReferenceReplayer:
    """The oracle, splitting a turn too long for the budget as the server does
    (`sir_vllm.policy.chunks`: `chunk` tokens a pass, a first turn against the
    model's `window`)."""

    def __init__(self, policy: Policy, model: str, chunk: int | None = None,
                 window: int | None = None):
        from .policy.chunks import default_chunk
        from .reference import Llama, ReferenceSession

        self.r = _renderer(model)
        self.session = ReferenceSession(Llama(model), policy)
        self.last: list[int] | None = None
        self.chunk = chunk or (default_chunk(policy) if policy.cache_size else None)
        self.window = window

    def turn(self, user: str, max_tokens: int, forced: list[int] | None = None):
        new = self.r.turn_ids(user, self.last)
        eos = {self.r.tokenizer.eos_token_id}
        result = self.session.generate(new, max_tokens, stop_ids=eos, forced=forced,
                                       chunk=self.chunk, window=self.window)
        self.last = result.answer_ids
        text = self.r.tokenizer.decode(result.answer_ids, skip_special_tokens=True)
        return ReplayTurn(text, result.answer_ids, result.retained, result.logprobs, new), result

    def close(self) -> None:
        pass


class ServerReplayer:
    def __init__(self, policy: Policy, model: str, url: str, served_model_name: str | None,
                 api_key: str = "unused", session_id: str | None = None):
        from openai import OpenAI

        if not url:
            raise ValueError("--backend server needs --url")
        if policy.name == "full":
            raise ValueError("--backend server needs a bounded policy (sirllm or streaming)")
        self.r = _renderer(model)
        self.client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, timeout=600)
        self.model = served_model_name or self.client.models.list().data[0].id
        self.session_id = session_id or f"replay-{uuid.uuid4().hex[:12]}"
        self.policy = policy.to_dict()
        self.policy.pop("cache_size", None)
        self.last: list[int] | None = None

    def turn(self, user: str, max_tokens: int, forced=None, **extra):
        """One turn; `extra`: more body fields (e.g. `ignore_eos`)."""
        new = self.r.turn_ids(user, self.last)
        out = self.client.completions.create(
            model=self.model, prompt=new, max_tokens=max_tokens, temperature=0.0, logprobs=0,
            extra_body={"session_id": self.session_id, "return_token_ids": True,
                        "kv_policy": self.policy, "skip_special_tokens": False, **extra},
        )
        choice = out.choices[0]
        ids = list(choice.token_ids)
        self.last = ids
        text = self.r.tokenizer.decode(ids, skip_special_tokens=True)
        retained = out.model_extra["session"]["retained_tokens"]
        return ReplayTurn(text, ids, retained, list(choice.logprobs.token_logprobs), new), out

    def close(self) -> None:
        self.client.close()


def make_replayer(backend: str, policy: Policy, model: str, url: str | None = None,
                  served_model_name: str | None = None, api_key: str = "unused"):
    if backend == "reference":
        return ReferenceReplayer(policy, model)
    if backend == "server":
        return ServerReplayer(policy, model, url, served_model_name, api_key)
    raise ValueError(f"unknown backend {backend!r}")
