"""One dialogue through a bounded KV cache under a policy: the oracle.

Per turn: evict (policy keep set, scores decayed from the second turn on),
prefill the turn's tokens, then either generate greedily (chat) or score
candidate answers and keep the picked one (the paper's choice tasks). Every
token that gets KV gets a score: its surprisal, by the policy's score variant.

Token accounting, shared with the vLLM path: in generation, the last sampled
token has no KV yet; it is carried as the first input token of the next turn,
and a turn reserves len(new tokens) + max_tokens, so the cache never exceeds
the budget after the turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..policy import Policy, SessionScores, turn_scores
from ..policy.chunks import fits_whole, split_turn
from .llama import KVCache, Llama


@dataclass
class TurnResult:
    input_ids: list[int]            # tokens prefilled this turn (carried token first)
    answer_ids: list[int]           # generated tokens, or the picked candidate
    logprobs: list[float]           # log p of each answer token
    kept: list[int] | None          # indices of the previous cache kept (None: no eviction)
    retained: int                   # tokens with KV after the turn
    greedy_ids: list[int] = field(default_factory=list)   # oracle argmax at each answer step
    top_logprobs: list[float] = field(default_factory=list)  # oracle max log p at each step
    choice: int | None = None       # picked candidate (choice turns)
    candidate_logprobs: list[list[float]] | None = None
    passes: int = 1                 # engine passes the turn took (a long turn: several)
    chunks: int = 0                 # prefill passes of a long input
    segments: int = 1               # passes that generated the answer


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


class ReferenceSession:
    """A session's cache, token ids and scores, in plain PyTorch."""

    def __init__(self, model: Llama, policy: Policy):
        self.model = model
        self.policy = policy
        self.cache: KVCache = model.empty_cache()
        self.ids: list[int] = []          # token ids that have KV, in cache order
        self.pending: list[int] = []      # sampled but not yet fed (no KV)
        self.book = SessionScores()
        self._last_row: torch.Tensor | None = None  # feed(): prediction after the last token

    @property
    def scores(self) -> np.ndarray:
        return self.book.scores

    def _begin_turn(self, num_coming: int, continues: bool = False) -> list[int] | None:
        keep = self.book.before_turn(self.policy, num_coming, continues_turn=continues)
        if keep is None:
            return None
        self.cache = self.cache.select(torch.as_tensor(keep, dtype=torch.long))
        self.ids = [self.ids[i] for i in keep]
        return [int(i) for i in keep]

    def _commit(self, tokens: list[int], kv: KVCache, log_probs: torch.Tensor,
                continues: bool = False) -> None:
        """Append a turn's tokens with their K/V and scores.

        log_probs[j] is the log-softmax row at the position of tokens[j]
        (row len(tokens)-1 is the prediction after the last token).
        """
        t = torch.as_tensor(tokens)
        n = len(tokens)
        if self.policy.score == "reference-code":
            # The released code scores a token with the logit row at its own position.
            surprisal = -log_probs[torch.arange(n), t]
        else:
            surprisal = torch.full((n,), float("nan"), dtype=torch.float64)
            surprisal[1:] = -log_probs[torch.arange(n - 1), t[1:]]
        self.book.after_turn(turn_scores(self.policy.score, surprisal.numpy()), continues_turn=continues)
        self.cache = self.cache.extend(kv)
        self.ids.extend(tokens)

    def generate(self, new_ids: list[int], max_tokens: int, stop_ids: set[int] = frozenset(),
                 forced: list[int] | None = None, chunk: int | None = None,
                 window: int | None = None) -> TurnResult:
        """Greedy answer to `new_ids` (or, with `forced`, replay those tokens and
        report what the oracle would have picked at each step).

        With `chunk`, a turn too long to run whole (`sir_vllm.policy.chunks`;
        a first turn against the model's `window`) runs as passes of at most
        `chunk` tokens: the input in prefill pieces, the answer in segments."""
        inputs = self.pending + list(new_ids)
        if chunk is not None and not fits_whole(
                self.policy, self.book.turns == 0, len(new_ids) + max_tokens,
                len(self.ids) + len(inputs) + max_tokens, window):
            return self._generate_long(list(new_ids), max_tokens, stop_ids, forced, chunk)
        return self._generate_pass(list(new_ids), max_tokens, stop_ids, forced)

    def _generate_long(self, new_ids, max_tokens, stop_ids, forced, chunk) -> TurnResult:
        inputs = self.pending + new_ids
        split = split_turn(len(inputs), max_tokens, chunk)
        at, continues, first_kept = 0, False, None
        for size in split.pieces[:-1]:
            piece = inputs[at:at + size]
            _, kept = self.feed(piece[len(self.pending):], continues=continues)
            first_kept = kept if not continues else first_kept
            at, continues = at + size, True
        last = inputs[at:][len(self.pending):]
        results, done = [], 0
        for k, seg in enumerate(split.segments):
            part = None if forced is None else forced[done:done + seg]
            if part == []:
                break  # the replayed answer ended (a stop) before max_tokens
            r = self._generate_pass(last if k == 0 else [], seg, stop_ids, part, continues=continues)
            first_kept = r.kept if not continues else first_kept
            continues, done = True, done + len(r.answer_ids)
            results.append(r)
            if forced is None and r.answer_ids[-1] in stop_ids:
                break
        cat = lambda field: [x for r in results for x in getattr(r, field)]
        chunks = len(split.pieces) - 1
        return TurnResult(inputs, cat("answer_ids"), cat("logprobs"), first_kept, len(self.ids),
                          cat("greedy_ids"), cat("top_logprobs"), passes=chunks + len(results),
                          chunks=chunks, segments=len(results))

    def _generate_pass(self, new_ids: list[int], max_tokens: int, stop_ids=frozenset(),
                       forced: list[int] | None = None, continues: bool = False) -> TurnResult:
        inputs = self.pending + list(new_ids)
        # Room for the new tokens and the answer; the carried token needs none:
        # it stands in for this turn's last answer token, which gets no KV.
        kept = self._begin_turn(len(new_ids) + max_tokens, continues)
        logits, kv = self.model.forward(torch.as_tensor([inputs]), self.cache)
        rows = [_log_softmax(logits[0])]          # rows[...][j]: prediction after token j
        answer, logprobs, greedy, top = [], [], [], []
        kvs = [kv]
        cache = self.cache.extend(_squeeze(kv))
        steps = len(forced) if forced is not None else max_tokens
        for step in range(steps):
            last = rows[-1][-1]
            best = int(last.argmax())
            token = forced[step] if forced is not None else best
            answer.append(token)
            logprobs.append(float(last[token]))
            greedy.append(best)
            top.append(float(last[best]))
            if step == steps - 1 or (forced is None and token in stop_ids):
                break
            logits, kv = self.model.forward(torch.as_tensor([[token]]), cache)
            kvs.append(kv)
            cache = cache.extend(_squeeze(kv))
            rows.append(_log_softmax(logits[0]))
        fed = inputs + answer[:-1]
        self._commit(fed, _cat_kv(kvs), torch.cat(rows, dim=0), continues)
        self.pending = answer[-1:]
        return TurnResult(inputs, answer, logprobs, kept, len(self.ids), greedy, top)

    def choose(self, context_ids: list[int], candidates: list[list[int]], pick) -> TurnResult:
        """Score every candidate continuation of `context_ids` on top of the
        cache; `pick(candidate_logprobs) -> index` chooses; the picked
        candidate joins the cache with the context (as the paper does)."""
        inputs = self.pending + list(context_ids)
        self.pending = []
        longest = max(len(c) for c in candidates)
        kept = self._begin_turn(len(inputs) + longest)
        ctx_logits, ctx_kv = self.model.forward(torch.as_tensor([inputs]), self.cache)
        ctx_rows = _log_softmax(ctx_logits[0])
        cache = self.cache.extend(_squeeze(ctx_kv))
        pad = self.model.config.vocab_size - 1
        batch = torch.tensor([c + [pad] * (longest - len(c)) for c in candidates])
        cand_logits, cand_kv = self.model.forward(batch, cache)
        cand_logprobs = []
        for b, cand in enumerate(candidates):
            prev = torch.cat([ctx_rows[-1:], _log_softmax(cand_logits[b, : len(cand) - 1])])
            cand_logprobs.append([float(prev[j, tok]) for j, tok in enumerate(cand)])
        k = int(pick(cand_logprobs))
        n = len(candidates[k])
        picked_kv = KVCache([x[k, :, :n] for x in cand_kv.keys], [x[k, :, :n] for x in cand_kv.values])
        rows = torch.cat([ctx_rows, _log_softmax(cand_logits[k, :n])])
        self._commit(inputs + candidates[k], _cat_kv([_squeeze(ctx_kv), picked_kv]), rows)
        return TurnResult(inputs, candidates[k], cand_logprobs[k], kept, len(self.ids),
                          choice=k, candidate_logprobs=cand_logprobs)

    def feed(self, ids: list[int], continues: bool = False) -> tuple[list[float], list[int] | None]:
        """Prefill a turn without answering (streams for perplexity). Returns
        log p of each token given everything before it in the cache (the first
        token's from the previous turn's last row, NaN on the first turn).
        `continues`: a later prefill pass of one long turn (no decay)."""
        inputs = self.pending + list(ids)
        self.pending = []
        kept = self._begin_turn(len(inputs), continues)
        logits, kv = self.model.forward(torch.as_tensor([inputs]), self.cache)
        rows = _log_softmax(logits[0])
        t = torch.as_tensor(inputs)
        lp = [float("nan") if self._last_row is None else float(self._last_row[t[0]])]
        lp += rows[torch.arange(len(inputs) - 1), t[1:]].tolist()
        self._commit(inputs, _squeeze(kv), rows, continues)
        self._last_row = rows[-1]
        return lp, kept


def _squeeze(kv: KVCache) -> KVCache:
    """[1, H, T, D] batch-of-one K/V → the cache's [H, T, D]."""
    return KVCache([k[0] if k.dim() == 4 else k for k in kv.keys],
                   [v[0] if v.dim() == 4 else v for v in kv.values])


def _cat_kv(parts: list[KVCache]) -> KVCache:
    parts = [_squeeze(p) for p in parts]
    return KVCache([torch.cat(ks, dim=1) for ks in zip(*(p.keys for p in parts))],
                   [torch.cat(vs, dim=1) for vs in zip(*(p.values for p in parts))])
