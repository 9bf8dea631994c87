"""Where a task's sessions run. `reference`: the oracle in this process;
`server`: a live `vllm serve --kv-policy ...` (`server_backend.py`).

A backend opens task sessions (`TaskSession`: one dialogue of a task, named
apart from the server's `sessions.store.Session` and the oracle's
`reference.ReferenceSession`, which they drive). A task session answers choice
turns (picks a candidate, which then stays in its cache), generates answers
(greedy, the recall task's filler turns) and feeds text (for perplexity). A
backend's `concurrency` says how many sessions the tasks may run at once, its
`max_model_len` how long one conversation may grow (the model's window).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..chat import ChatRenderer
from ..policy import Policy
from . import scoring


@dataclass
class Choice:
    index: int
    logprobs: list[list[float]]
    retained: int
    scores: list[float] = field(default_factory=list)  # the values `scoring.pick` compared


@dataclass
class Generated:
    """A greedy answer: its token ids (the end-of-message token included when
    the model stopped there), the turn's new input tokens, and the cache size."""
    ids: list[int]
    input_tokens: int
    retained: int


class TaskSession(Protocol):
    """One dialogue of an eval task on a backend (one cache, turn after turn)."""

    def choose(self, question: str, texts: list[str], mode: str) -> Choice: ...
    def generate(self, message: str, max_tokens: int) -> Generated: ...
    def feed(self, role: str, content: str) -> list[float]: ...
    def holds_text(self, text: str) -> bool: ...


class ReferenceBackend:
    """Sessions of the PyTorch oracle on a local checkpoint."""

    name = "reference"
    concurrency = 1  # one model in this process: sessions run one after another

    def __init__(self, model_dir: Path | str):
        from transformers import AutoTokenizer

        from ..reference import Llama

        self.model = Llama(model_dir)
        self.renderer = ChatRenderer(AutoTokenizer.from_pretrained(model_dir))
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.max_model_len = config.get("max_position_embeddings")

    def new_session(self, policy: Policy) -> "OracleTaskSession":
        return OracleTaskSession(self, policy)


class OracleTaskSession:
    """A task session on the oracle (`ReferenceSession` in this process)."""

    def __init__(self, backend: ReferenceBackend, policy: Policy):
        from ..reference import ReferenceSession

        self.r = backend.renderer
        self.session = ReferenceSession(backend.model, policy)
        self.last_answer: list[int] | None = None
        self.first_message = True

    def choose(self, question: str, texts: list[str], mode: str) -> Choice:
        context = self.r.turn_ids(question, self.last_answer)
        cands = [self.r.answer_ids(t) for t in texts]
        lengths = [len(self.r.encode(t)) for t in texts]
        turn = self.session.choose(
            context, cands, pick=lambda lps: scoring.pick(mode, texts, lengths, lps))
        self.last_answer = cands[turn.choice]
        return Choice(turn.choice, turn.candidate_logprobs, turn.retained,
                      scoring.values(mode, texts, lengths, turn.candidate_logprobs))

    def generate(self, message: str, max_tokens: int) -> Generated:
        """A user turn answered greedily, up to max_tokens or the end of message."""
        context = self.r.turn_ids(message, self.last_answer)
        turn = self.session.generate(context, max_tokens, stop_ids={self.r.tokenizer.eos_token_id})
        self.last_answer = turn.answer_ids
        return Generated(list(turn.answer_ids), len(context), turn.retained)

    def holds_text(self, text: str) -> bool:
        """Whether `text` still reads, whole, in the cache's tokens (decoded:
        in context, "[chocolate]." tokenizes as " [", "ch", "ocolate", "].")."""
        return text in self.r.tokenizer.decode(self.session.ids)

    def feed(self, role: str, content: str) -> list[float]:
        ids = self.r.encode(self.r.message_text(role, content, self.first_message))
        self.first_message = False
        logprobs, _ = self.session.feed(ids)
        return logprobs


def make_backend(name: str, model: str | None = None, url: str | None = None,
                 api_key: str | None = None, concurrency: int = 8,
                 served_model_name: str | None = None):
    if name == "reference":
        if not model:
            raise ValueError("--backend reference needs --model DIR")
        return ReferenceBackend(model)
    if name == "server":
        from .server_backend import ServerBackend

        if not url:
            raise ValueError("--backend server needs --url (e.g. http://127.0.0.1:8000)")
        return ServerBackend(url, model=model, api_key=api_key, concurrency=concurrency,
                             served_model_name=served_model_name)
    raise ValueError(f"unknown backend {name!r} (available: reference, server)")
