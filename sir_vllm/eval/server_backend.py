"""The eval tasks on a live `vllm serve --kv-policy ...`, through its session API.

Each dialogue (an RPS player) is one server session; the task runner keeps
several in flight (`concurrency`), turns within one session run in order.
The token stream is the oracle's (`ChatRenderer` with the served model's
tokenizer), sent as token ids on `/v1/completions`, so the two backends differ
only in where the KV lives. A choice turn mirrors `ReferenceSession.choose`:

    one peek per candidate   prompt = context + candidate, max_tokens 0,
                             prompt_logprobs 0, session_peek, reserve
    one committing prefill   prompt = context + picked candidate, reserve

with reserve = len(context) + the longest candidate (+ 1 for the token a
generated answer left pending), the oracle's eviction (`num_coming`), so every
peek and the commit see the same keep set. A fed message (stream-ppl) is a
prefill reserving its own length, as `feed` does. A generated answer (the
recall task's filler turns) is a completions turn with `max_tokens`, greedy,
stopping at the end-of-message token, as `ReferenceSession.generate` does;
its last token stays pending on the server (no KV yet), as in the oracle.
The policy's knobs go with every request (`kv_policy`), so the server's own
default policy does not matter; `full` is a session that never evicts.
"""

from __future__ import annotations

import logging
import math
import uuid

from ..chat import ChatRenderer
from ..policy import Policy
from . import scoring
from .backends import Choice, Generated

logger = logging.getLogger(__name__)


class ServerBackend:
    """Sessions on a server; `model` is the tokenizer (default: the served model's path)."""

    name = "server"

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, served_model_name: str | None = None,
                 timeout: float = 900.0):
        import openai
        from transformers import AutoTokenizer

        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        self.url = url.rstrip("/")
        self.concurrency = concurrency
        # No retries: a retried committing turn would land twice in a session.
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "unused",
                                    timeout=timeout, max_retries=0)
        cards = self._call(lambda: self.client.models.list().data)
        if not cards:
            raise RuntimeError(f"the server at {self.url} serves no model")
        card = next((c for c in cards if c.id == served_model_name), None) if served_model_name \
            else cards[0]
        if card is None:
            raise RuntimeError(f"the server at {self.url} does not serve {served_model_name!r} "
                               f"(it serves {', '.join(c.id for c in cards)})")
        self.model_name = card.id
        self.max_model_len = (card.model_extra or {}).get("max_model_len")
        self.tokenizer_path = model or (card.model_extra or {}).get("root") or card.id
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot load the tokenizer from {self.tokenizer_path!r} (pass "
                               f"--model DIR, the served checkpoint): {e}") from None
        self.renderer = ChatRenderer(tokenizer)

    def _call(self, fn):
        """Run one API call; connection and HTTP errors become RuntimeErrors
        with a message (the CLI prints it instead of a traceback)."""
        import openai

        try:
            return fn()
        except openai.APIConnectionError as e:
            raise RuntimeError(f"cannot reach the server at {self.url} ({e}); is `vllm serve "
                               f"--kv-policy ...` running there?") from None
        except openai.AuthenticationError:
            raise RuntimeError(f"the server at {self.url} refused the API key (--api-key)") from None
        except openai.APIStatusError as e:
            raise RuntimeError(f"the server at {self.url} answered {e.status_code}: "
                               f"{_message(e)}") from None

    def knobs(self, policy: Policy) -> dict:
        """The per-request `kv_policy` body field for `policy`."""
        if policy.name == "full":
            if not self.max_model_len:
                raise RuntimeError("--policy full on a server needs its max_model_len "
                                   "(not in /v1/models)")
            # Never evicts: any session the engine can hold fits the budget.
            return {"name": "streaming", "start_size": 0, "recent_size": int(self.max_model_len)}
        knobs = policy.to_dict()
        knobs.pop("cache_size", None)
        return knobs

    def new_session(self, policy: Policy) -> "ServerTaskSession":
        return ServerTaskSession(self, policy)

    def complete(self, prompt: list[int], body: dict, max_tokens: int = 0) -> dict:
        """One session turn on /v1/completions (max_tokens 0: a prefill), greedy."""
        out = self._call(lambda: self.client.completions.create(
            model=self.model_name, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
            extra_body=body).model_dump())
        if not isinstance(out.get("session"), dict):
            raise RuntimeError(f"the server at {self.url} answered without a session: start it "
                               f"with `vllm serve ... --kv-policy sirllm` (or streaming)")
        return out

    def session_info(self, session_id: str) -> dict:
        return self._call(lambda: self.client.get(f"/sessions/{session_id}", cast_to=object))

    def delete_session(self, session_id: str) -> None:
        self._call(lambda: self.client.delete(f"/sessions/{session_id}", cast_to=object))


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(error)


def _logprob(row: dict | None, token: int) -> float:
    entry = (row or {}).get(str(token))
    if entry is None:
        raise RuntimeError(f"the server returned no prompt logprob for token {token}")
    return float(entry["logprob"])


class ServerTaskSession:
    """A task session on a server: one dialogue as one server session (a fresh id)."""

    def __init__(self, backend: ServerBackend, policy: Policy):
        self.b = backend
        self.r = backend.renderer
        self.policy = policy
        self.knobs = backend.knobs(policy)
        self.id = f"eval-{uuid.uuid4().hex[:16]}"
        self.last_answer: list[int] | None = None
        self.first_message = True
        self.started = False
        self.pending = False  # a generated answer's last token waits, without KV, on the server

    def _prefill(self, ids: list[int], peek: bool = False, reserve: int | None = None,
                 scores: bool = True) -> dict:
        body = {"session_id": self.id, "kv_policy": self.knobs}
        if peek:
            body["session_peek"] = True
        if reserve is not None:
            body["session_reserve_tokens"] = reserve
        if scores:
            body["prompt_logprobs"] = 0
        out = self.b.complete(ids, body)
        if not peek:
            self._committed(out)
            self.pending = False  # a prefill caches the pending token with the prompt
        return out

    def _committed(self, out: dict) -> None:
        if not self.started:
            self.started = True
            self._check_policy(out["session"])

    def _check_policy(self, info: dict) -> None:
        """The session runs the asked budget (the server took `kv_policy`)."""
        want = self.policy.cache_size if self.policy.name != "full" else self.b.max_model_len
        if info.get("budget") != want:
            raise RuntimeError(f"the server's session has budget {info.get('budget')}, "
                               f"not the asked {want} ({self.policy!r})")

    def _tail_logprobs(self, out: dict, ids: list[int]) -> list[float | None]:
        """log p of each of `ids`, the prompt's last tokens (None: a row the
        server does not return, a loaded position's)."""
        rows = out["choices"][0].get("prompt_logprobs") or []
        rows = rows[len(rows) - len(ids):]
        return [None if row is None else _logprob(row, t) for row, t in zip(rows, ids)]

    def choose(self, question: str, texts: list[str], mode: str) -> Choice:
        context = self.r.turn_ids(question, self.last_answer)
        cands = [self.r.answer_ids(t) for t in texts]
        lengths = [len(self.r.encode(t)) for t in texts]
        reserve = len(context) + max(len(c) for c in cands) + self.pending
        if len(cands) == 1:  # nothing to choose: the commit's own rows are the scores
            out = self._prefill(context + cands[0], reserve=reserve)
            logprobs = [self._tail_logprobs(out, cands[0])]
            k = 0
        else:
            logprobs = [self._tail_logprobs(self._prefill(context + c, peek=True, reserve=reserve), c)
                        for c in cands]
            k = scoring.pick(mode, texts, lengths, logprobs)
            out = self._prefill(context + cands[k], reserve=reserve, scores=False)
        self.last_answer = cands[k]
        return Choice(k, logprobs, int(out["session"]["retained_tokens"]),
                      scoring.values(mode, texts, lengths, logprobs))

    def generate(self, message: str, max_tokens: int) -> Generated:
        """A user turn answered greedily, up to max_tokens or the end of message."""
        context = self.r.turn_ids(message, self.last_answer)
        body = {"session_id": self.id, "kv_policy": self.knobs, "return_token_ids": True,
                "skip_special_tokens": False,
                "stop_token_ids": [self.r.tokenizer.eos_token_id]}
        out = self.b.complete(context, body, max_tokens=max_tokens)
        self._committed(out)
        ids = [int(t) for t in out["choices"][0].get("token_ids") or []]
        if not ids:
            raise RuntimeError(f"the server at {self.b.url} returned no answer token ids")
        self.last_answer = ids
        self.pending = True
        return Generated(ids, len(context), int(out["session"]["retained_tokens"]))

    def holds_text(self, text: str) -> bool:
        """Whether `text` still reads, whole, in the session's kept tokens."""
        if not self.started:
            return False
        ids = [t["id"] for t in self.b.session_info(self.id)["tokens"]]
        return text in self.r.tokenizer.decode(ids)

    def feed(self, role: str, content: str) -> list[float]:
        ids = self.r.encode(self.r.message_text(role, content, self.first_message))
        self.first_message = False
        lps = self._tail_logprobs(self._prefill(ids), ids)
        return [math.nan] + [math.nan if lp is None else lp for lp in lps[1:]]

    def close(self) -> None:
        """Free the session on the server (its pinned KV)."""
        if self.started:
            self.started = False
            try:
                self.b.delete_session(self.id)
            except RuntimeError as e:  # never hide the run's own error behind this one
                logger.warning("sir-vllm eval: could not delete session %s: %s", self.id, e)
